#!/usr/bin/env python3
"""Talks to a running `uc serve` with the official OpenAI Python client and checks the
answers; prints one JSON object (what it saw) and exits 1 on the first failed check.

Used by crates/uc-cli/tests/serve.rs; also runnable by hand:

    uc serve packs/smollm2-q5 --port 8080 &
    python3 scripts/serve_openai_check.py --base-url http://127.0.0.1:8080/v1 --model smollm2-q5
"""
import argparse
import json
import sys

import openai  # a missing client is an error, not a skip


def check(cond, what):
    if not cond:
        print(json.dumps({"failed": what}))
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", default="The quick brown fox")
    ap.add_argument("--max-tokens", type=int, default=12)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base_url, api_key="unused", max_retries=0)
    seen = {"openai_version": openai.__version__}

    models = client.models.list()
    ids = [m.id for m in models.data]
    check(ids == [a.model], f"models.list ids {ids}")
    seen["models"] = ids

    msgs = [{"role": "user", "content": a.prompt}]
    kw = dict(model=a.model, messages=msgs, max_tokens=a.max_tokens, temperature=0)
    r1 = client.chat.completions.create(**kw)
    r2 = client.chat.completions.create(**kw)
    text = r1.choices[0].message.content
    check(text == r2.choices[0].message.content, "greedy chat is not deterministic")
    check(r1.choices[0].finish_reason in ("stop", "length"), "finish_reason")
    u = r1.usage
    check(u.total_tokens == u.prompt_tokens + u.completion_tokens, "usage total")
    check(u.completion_tokens <= a.max_tokens, "completion_tokens over max_tokens")
    check(r1.system_fingerprint is not None and len(r1.system_fingerprint) == 64, "fingerprint")
    seen["chat"] = {
        "text": text,
        "finish_reason": r1.choices[0].finish_reason,
        "usage": u.model_dump(exclude_none=True),
        "system_fingerprint": r1.system_fingerprint,
    }

    # Streaming: the deltas concatenate to the non-streamed text; usage arrives last.
    parts, usage, finish = [], None, None
    for chunk in client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    check("".join(parts) == text, "streamed text differs from non-streamed")
    check(usage is not None and usage.model_dump(exclude_none=True) == u.model_dump(exclude_none=True), "streamed usage")
    check(finish == r1.choices[0].finish_reason, "streamed finish_reason")
    seen["stream_chunks"] = len(parts)

    # Seeded sampling: same seed, same text.
    skw = dict(model=a.model, messages=msgs, max_tokens=a.max_tokens, temperature=1.0, seed=11)
    s1 = client.chat.completions.create(**skw).choices[0].message.content
    s2 = client.chat.completions.create(**skw).choices[0].message.content
    check(s1 == s2, "same seed gave different text")
    seen["seeded"] = s1

    c = client.completions.create(model=a.model, prompt=a.prompt, max_tokens=a.max_tokens, temperature=0)
    check(c.usage.completion_tokens <= a.max_tokens, "completions usage")
    seen["completion"] = {"text": c.choices[0].text, "usage": c.usage.model_dump(exclude_none=True)}

    # Errors surface as the client's typed exceptions (status + OpenAI error body).
    try:
        client.chat.completions.create(model="no-such-model", messages=msgs, max_tokens=2)
        check(False, "unknown model accepted")
    except openai.NotFoundError as e:
        check(e.status_code == 404, "unknown model status")
        seen["unknown_model"] = e.body
    try:
        client.chat.completions.create(model=a.model, messages=msgs, max_tokens=2, temperature=5)
        check(False, "temperature 5 accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400, "bad temperature status")
        seen["bad_temperature"] = e.body
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
