"""The embedded backbone (the built-in stream's tiny model, CPU): CRAM's stable-phase training step against
`lora-ft` at the same active rank (target <= 1.10x), generation on mixed-task batches (target <= 1.05x the
time) and CRAM's consolidation (target <= 1% of a task's training), through the library's own
sessions, methods and batches (what `cramcl run` executes), side by side in one process.

    python -m bench embedded_suite [--steps 20] [--repeats 15] [--json F]

Both methods first learn `shape` (same steps), then CRAM starts `colour` (same instruction: it joins shape's
group), trains its warm-up and consolidates; the timed steps are CRAM's stable phase on colour's records
(per-sample routing over the group's two experts, the penalty on) against `lora-ft` (rank = CRAM's mean
active rank over modules, rounded) training on the same records; CRAM as it runs on the CPU (the trainable
expert's own matmul chain beside the frozen expert's) and fused (its factors appended to the frozen chain, the
default off the CPU: ``RoutingContext.fuse_trainable``). Generation: the test records of both tasks,
shuffled together, in batches of 32, greedy; records/s and generated tokens/s. The methods' answers differ in
length (a batch decodes until its longest answer ends), so decoding is also timed at a fixed length: the same
batches, 16 new tokens each with the end token ignored (``decode_16``).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _timing import emit

from cramcl.api import load_config  # noqa: E402
from cramcl.engine.session import open_session  # noqa: E402
from cramcl.engine.trainer import global_batches, train_task  # noqa: E402
from cramcl.eval.evaluate import predict  # noqa: E402


def session(method: str, steps: int, extra: list[str]):
    cfg = load_config(method=method, profile="default",
                      overrides=["data.tasks=shape,colour", f"train.steps_per_task={steps}", *extra])
    s = open_session(cfg, Path(tempfile.mkdtemp()), log=lambda *a: None)
    tasks = list(s.bench.tasks)
    s.backbone.prepare([r for t in tasks for r in [*t.train, *t.test]])
    return s, tasks


def learn(s, tasks, upto: int, steps: int) -> None:
    for t in range(upto):
        torch.manual_seed(t)
        s.method.before_task(t, tasks[t])
        s.method.precompute(list(tasks[t].train))
        train_task(s.accelerator, s.backbone, s.method, list(tasks[t].train), s.cfg.train, t, seed=t)
        s.method.after_task(t)


def step_fn(s, records, batches, fuse: bool | None = None):
    """One optimizer step of the method's current phase on the next batch (the trainer's work, without Accelerate's
    bookkeeping, identical for both methods); ``fuse`` sets ``fuse_trainable`` for the step."""
    params = s.method.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=s.cfg.train.lr)
    model = s.backbone.model
    model.train()
    state = {"i": 0}

    def step():
        s.method.context.fuse_trainable = fuse
        batch = s.backbone.collate([records[i] for i in batches[state["i"] % len(batches)]], train=True)
        state["i"] += 1
        s.method.prepare_batch(batch, train=True)
        loss, _ = s.method.compute_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        s.method.context.fuse_trainable = None
    return step


@torch.no_grad()
def fixed_length_decode(s, batches: list, new_tokens: int) -> None:
    """Greedy decoding of every batch for exactly ``new_tokens`` steps (no id is the end token)."""
    model = s.backbone.model
    model.eval()
    for records in batches:
        batch = s.backbone.collate(records, train=False)
        s.method.prepare_batch(batch, train=False)
        inputs = {k: v for k, v in s.backbone.model_inputs(batch).items() if k != "labels"}
        model.greedy_generate(**inputs, max_new_tokens=new_tokens, eos_id=-1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="steps per task before the timed phase")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    cram, tasks = session("cram", args.steps, [])
    learn(cram, tasks, 1, args.steps)
    t = 1  # colour joins shape's group: warm-up, consolidation, then the stable phase we time
    cram.method.before_task(t, tasks[t])
    records = list(tasks[t].train)
    cram.method.precompute(records)
    phases = cram.method.phases(t, args.steps)
    batches = global_batches(len(records), 10_000, cram.cfg.train.batch_size, seed=1)
    warm = phases[0]
    cram.method.begin_phase(warm)
    run_warm = step_fn(cram, records, batches)
    t0 = time.perf_counter()
    for _ in range(warm.steps):
        run_warm()
    warm_s = (time.perf_counter() - t0) / warm.steps
    t0 = time.perf_counter()
    cram.method.end_phase(warm)  # CRAM's consolidation: the SVD of every module's buffer
    consolidation_s = time.perf_counter() - t0
    cram.method.begin_phase(phases[1])
    new = len(cram.method.expert_group) - 1
    group = cram.method._group_experts(cram.method.expert_group[new])
    ranks = [sum(layer.ranks[k] for k in group) for layer in cram.method.layers.values()]
    active_rank = round(sum(ranks) / len(ranks))

    lora, _ = session("lora-ft", args.steps, [f"method.rank={active_rank}", f"method.alpha={2 * active_rank}"])
    learn(lora, tasks, 1, args.steps)
    lora.method.before_task(t, tasks[t])
    lora.method.begin_phase(lora.method.phases(t, args.steps)[0])
    variants = {"cram": step_fn(cram, records, batches), "cram_fused": step_fn(cram, records, batches, fuse=True),
                "lora": step_fn(lora, records, batches)}
    for fn in variants.values():
        fn()
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    step = {k: statistics.median(v) for k, v in times.items()}
    cram.method.end_phase(phases[1])
    cram.method.after_task(t)
    lora.method.end_phase(lora.method.phases(t, args.steps)[0])
    lora.method.after_task(t)

    test = [r for task in tasks for r in task.test]
    random.Random(0).shuffle(test)
    gen_times, tokens = {"cram": [], "lora": []}, {}
    for _ in range(3):
        for name, s in (("cram", cram), ("lora", lora)):
            t0 = time.perf_counter()
            answers = predict(s.accelerator, s.backbone, s.method, test, 32, desc="bench")
            gen_times[name].append(time.perf_counter() - t0)
            tokens[name] = sum(len(a.split()) + 1 for a in answers)  # whitespace tokenizer: words + end token
    gen = {k: statistics.median(v) for k, v in gen_times.items()}
    chunks = [test[i:i + 32] for i in range(0, len(test), 32)]
    decode_times = {"cram": [], "lora": []}
    for _ in range(5):
        for name, s in (("cram", cram), ("lora", lora)):
            t0 = time.perf_counter()
            fixed_length_decode(s, chunks, 16)
            decode_times[name].append(time.perf_counter() - t0)
    decode = {k: statistics.median(v) for k, v in decode_times.items()}
    # a default-profile task: 100 steps, 20% warm-up (buffer) and 80% stable, at the step times measured here
    task_s = 0.2 * 100 * warm_s + 0.8 * 100 * step["cram"]
    result = {"consolidation_s": round(consolidation_s, 4), "task_train_s_estimate": round(task_s, 2),
              "consolidation_share_of_task": round(consolidation_s / task_s, 5), "active_rank": active_rank,
              "cram_step_s": round(step["cram"], 4), "lora_step_s": round(step["lora"], 4),
              "step_cram_over_lora": round(step["cram"] / step["lora"], 3),
              "cram_fused_step_s": round(step["cram_fused"], 4),
              "step_cram_fused_over_lora": round(step["cram_fused"] / step["lora"], 3), "eval_records": len(test),
              "cram_gen_s": round(gen["cram"], 3), "lora_gen_s": round(gen["lora"], 3),
              "cram_tokens_per_s": round(tokens["cram"] / gen["cram"], 1),
              "lora_tokens_per_s": round(tokens["lora"] / gen["lora"], 1),
              "gen_time_cram_over_lora": round(gen["cram"] / gen["lora"], 3),
              "cram_decode_16_s": round(decode["cram"], 3), "lora_decode_16_s": round(decode["lora"], 3),
              "decode_16_cram_over_lora": round(decode["cram"] / decode["lora"], 3)}
    print(f"embedded backbone, {torch.get_num_threads()} threads: stable-phase step CRAM {step['cram'] * 1e3:.1f} ms vs "
          f"lora-ft (rank {active_rank}) {step['lora'] * 1e3:.1f} ms = {result['step_cram_over_lora']:.2f}x, fused "
          f"{step['cram_fused'] * 1e3:.1f} ms = {result['step_cram_fused_over_lora']:.2f}x; generation "
          f"of {len(test)} mixed records {gen['cram']:.2f} s vs {gen['lora']:.2f} s = {result['gen_time_cram_over_lora']:.2f}x "
          f"(16 tokens each: {decode['cram']:.2f} s vs {decode['lora']:.2f} s = {result['decode_16_cram_over_lora']:.2f}x); "
          f"consolidation {consolidation_s:.3f} s = {100 * consolidation_s / task_s:.2f}% of a 100-step task ({task_s:.1f} s)")
    emit("embedded_suite", result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
