//! GGUF import (owned by the gguf work; placeholder).
