"""Prototype (research only, not part of uc): block-wise tuning of a quantized model's
RMSNorm gains against the teacher's block outputs (issue 10 item 2; docs/research-log.md,
2026-12-05). Needs torch and transformers (e.g. a venv with requirements-reference.txt).

  uc export --to safetensors --dtype f32 PACK STUDENT_DIR
  python scripts/norm_tune_prototype.py assets/smollm2-135m STUDENT_DIR OUT_DIR --steps 30 --lr 3e-4

Calibration: windows of --len tokens from assets/calib's genres in turn; the first --train
fit the gains (Adam on a relative change), the next --val pick the step (early stopping).
Prints each layer's held-out block error before and after; writes OUT_DIR (STUDENT_DIR with
the tuned gains) and OUT_DIR/tune_log.json.
"""
import argparse, json, os, shutil, sys, time, glob, random
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("teacher"); ap.add_argument("student"); ap.add_argument("out")
ap.add_argument("--train", type=int, default=16)
ap.add_argument("--val", type=int, default=4)
ap.add_argument("--len", type=int, default=256)
ap.add_argument("--steps", type=int, default=40)
ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--loss", default="chan", choices=["chan", "plain"])
ap.add_argument("--target", default="teacher", choices=["teacher", "own"])
ap.add_argument("--what", default="both", choices=["both", "attn", "mlp", "final"])
args = ap.parse_args()
torch.manual_seed(0)
torch.set_num_threads(2)

tok = Tokenizer.from_file(os.path.join(args.teacher, "tokenizer.json"))
genres = []
for g in sorted(glob.glob("assets/calib/*")):
    files = sorted(glob.glob(g + "/**/*", recursive=True))
    text = "\n\n".join(open(f, errors="replace").read() for f in files if os.path.isfile(f))
    genres.append(tok.encode(text[:3_000_000]).ids)
rng = random.Random(1)
n = args.train + args.val
wins = []
for i in range(n):
    ids = genres[i % len(genres)]
    s = rng.randrange(0, len(ids) - args.len)
    wins.append(ids[s:s + args.len])
ids = torch.tensor(wins)

kw = dict(torch_dtype=torch.float32, attn_implementation="sdpa")
teacher = LlamaForCausalLM.from_pretrained(args.teacher, **kw).eval()
student = LlamaForCausalLM.from_pretrained(args.student, **kw).eval()
for p in list(teacher.parameters()) + list(student.parameters()):
    p.requires_grad_(False)

pos_ids = torch.arange(args.len).unsqueeze(0)
with torch.no_grad():
    ht = teacher.model.embed_tokens(ids)
    hs = student.model.embed_tokens(ids)
    pe = teacher.model.rotary_emb(ht, pos_ids)


def run(layer, h):
    out = layer(h, attention_mask=None, position_ids=pos_ids, position_embeddings=pe)
    return out[0] if isinstance(out, tuple) else out


tr, va = slice(0, args.train), slice(args.train, n)
log = []
t0 = time.time()
for li, (tl, sl) in enumerate(zip(teacher.model.layers, student.model.layers)):
    with torch.no_grad():
        yt = run(tl, ht)
        yt_own = run(tl, hs)
    target = yt if args.target == "teacher" else yt_own
    w = 1.0 / target[tr].pow(2).mean(dim=(0, 1)).clamp_min(1e-12) if args.loss == "chan" else None

    def loss_of(y, t):
        e = (y - t).pow(2).mean(dim=(0, 1))
        return (e * w).mean() if w is not None else e.mean()

    mods = []
    if args.what in ("both", "attn"):
        mods.append(sl.input_layernorm)
    if args.what in ("both", "mlp"):
        mods.append(sl.post_attention_layernorm)
    base = [m.weight.detach().clone() for m in mods]
    for m, b in zip(mods, base):
        del m.weight
        m.weight = b.clone()
    deltas = [torch.zeros_like(b, requires_grad=True) for b in base]
    opt = torch.optim.Adam(deltas, lr=args.lr)

    def set_gains(ds, grad):
        for m, b, d in zip(mods, base, ds):
            m.weight = b * (1 + (d if grad else d.detach()))

    def val_loss():
        with torch.no_grad():
            set_gains(deltas, False)
            return loss_of(run(sl, hs[va]), target[va]).item()

    v0 = val_loss()
    best = (v0, [d.detach().clone() for d in deltas], 0)
    for step in range(args.steps):
        opt.zero_grad()
        set_gains(deltas, True)
        l = loss_of(run(sl, hs[tr]), target[tr])
        l.backward()
        opt.step()
        v = val_loss()
        if v < best[0]:
            best = (v, [d.detach().clone() for d in deltas], step + 1)
    set_gains(best[1], False)
    with torch.no_grad():
        hs = run(sl, hs)
    ht = yt
    log.append({"layer": li, "val_before": v0, "val_after": best[0], "best_step": best[2]})
    print(f"layer {li}: val {v0:.4e} -> {best[0]:.4e} (step {best[2]}), {time.time()-t0:.0f}s", flush=True)

os.makedirs(args.out, exist_ok=True)
for f in os.listdir(args.student):
    if f != "model.safetensors":
        shutil.copy(os.path.join(args.student, f), args.out)
sd = load_file(os.path.join(args.student, "model.safetensors"))
for li, sl in enumerate(student.model.layers):
    sd[f"model.layers.{li}.input_layernorm.weight"] = sl.input_layernorm.weight.detach().clone()
    sd[f"model.layers.{li}.post_attention_layernorm.weight"] = sl.post_attention_layernorm.weight.detach().clone()
save_file(sd, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
json.dump({"args": vars(args), "log": log}, open(os.path.join(args.out, "tune_log.json"), "w"), indent=1)
