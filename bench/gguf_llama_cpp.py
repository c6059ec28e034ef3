"""The export stage's GGUF files run in llama.cpp itself, against the merged model in transformers.

For the first `--prompts` validation conversations: does llama.cpp tokenize the prompt into the
same ids, and is its greedy reply the merged model's? llama-cpp-python is not a project dependency
(it compiles llama.cpp for several minutes), so it lives in a venv of its own:

    python3 -m venv /tmp/lcpp && /tmp/lcpp/bin/pip install llama-cpp-python
    .venv/bin/python -m bench.gguf_llama_cpp --llama-python /tmp/lcpp/bin/python

Reads models/gguf/, models/adapter/merged/, data/prepared/val.jsonl (a finished `dvc repro`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from ftpipe.io import read_jsonl
from ftpipe.paths import ADAPTER_DIR, GGUF_DIR, PREPARED_DIR

# Run by the llama-cpp-python interpreter: ids and greedy reply of each prompt, as JSON.
LLAMA_CPP = """
import json, sys
from llama_cpp import Llama, __version__
path, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.stdin.read())
llm = Llama(model_path=path, n_ctx=1024, n_threads=2, verbose=False)
out = []
for p in prompts:
    ids = llm.tokenize(p.encode(), add_bos=False, special=True)
    reply = llm(p, max_tokens=max_tokens, temperature=0.0, top_k=1)["choices"][0]["text"]
    out.append({"ids": ids, "reply": reply})
print(json.dumps({"version": __version__, "rows": out}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", required=True, help="python of a venv with llama-cpp-python")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    from ftpipe import metrics, models
    from ftpipe.chat import prompt_text

    merged = ADAPTER_DIR / models.MERGED
    tokenizer, model = models.load_tokenizer(merged), models.load_model(merged)
    prompts = [prompt_text(tokenizer, r["messages"]) for r in read_jsonl(PREPARED_DIR / "val.jsonl")[: args.prompts]]
    expected = metrics.generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=len(prompts))
    print(f"{len(prompts)} validation prompts, greedy, {args.max_new_tokens} new tokens; reference: {merged} (transformers, fp32)")
    print("| file | llama.cpp | same token ids | same greedy reply |\n|---|---|---:|---:|")
    for path in sorted(Path(GGUF_DIR).glob("*.gguf")):
        done = subprocess.run([args.llama_python, "-c", LLAMA_CPP, str(path), str(args.max_new_tokens)],
                              input=json.dumps(prompts), capture_output=True, text=True, check=True)
        result = json.loads(done.stdout)
        same_ids = sum(r["ids"] == tokenizer(p, add_special_tokens=False)["input_ids"]
                       for r, p in zip(result["rows"], prompts))
        same_reply = sum(r["reply"].strip() == e for r, e in zip(result["rows"], expected))
        print(f"| {path.name} | {result['version']} | {same_ids}/{len(prompts)} | {same_reply}/{len(prompts)} |")
        for r, e in zip(result["rows"], expected):
            if r["reply"].strip() != e:
                print(f"  differs: llama.cpp {r['reply'].strip()!r} vs transformers {e!r}")


if __name__ == "__main__":
    main()
