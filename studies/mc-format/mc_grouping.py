"""Does MiniLM put the multiple-choice records of both MC tasks in one CRAM group, apart from the stream's
four formats? CRAM's level-1 rule with the default profile's settings, over the built-in stream with
mc-shape and mc-digit inserted (each task: decide on the mean of its first group_init_samples train
questions, then fold all its train questions into the prototype); then every test record of every task is
assigned (argmax cosine) and the share landing in its task's group is printed.

    python studies/mc-format/mc_grouping.py [--second mc-corner-fixed]
    python studies/mc-format/mc_grouping.py --stream     # the built-in stream as it ships
"""
from __future__ import annotations

import torch

from cramcl.config import resolve_config
from cramcl.data.builtin import TASK_INFO
from cramcl.encoders import TextEncoder
from cramcl.methods.cram import CramConfig
from cramcl.methods.cram.groups import InstructionGroups
from cramcl.routing.prototypes import cosine_to_prototypes
from mc_study import MC_TASKS, V4_TASKS

ORDER = ("shape", "digits", "corner", "mc-shape", "caption", "colour", "ocr", "digit-corner", "mc-digit",
         "count", "stripes")
N = 200


def main(order=ORDER, stream: bool = False) -> None:
    """``stream``: the built-in stream itself (its tasks, order and stem), not the study's."""
    cfg = CramConfig(**resolve_config(method="cram", profile="default").method_args)
    groups = InstructionGroups(cfg.join_threshold, cfg.theta, cfg.max_groups)
    encoder = TextEncoder("minilm")
    if stream:
        tasks = {t.name: (i, t) for i, t in enumerate(TASK_INFO)}
        order = tuple(tasks)
    else:
        tasks = {t.name: (i, t) for i, t in enumerate(V4_TASKS)}
        tasks.update({t.name: (len(V4_TASKS) + i, t) for i, t in enumerate(MC_TASKS)})
    group_of, tests = {}, {}
    for name in order:
        index, task = tasks[name]
        train = [s.question for s in task.make("train", N, (0, index), 64, set())]
        tests[name] = [s.question for s in task.make("test", N, (0, index), 64, set())]
        t = encoder.encode(train)
        t_task = t[: cfg.group_init_samples].mean(0)
        sims = cosine_to_prototypes(t_task[None], groups.prototypes)[0] if groups.num_groups else None
        top = sorted(sims.tolist(), reverse=True)[:2] if sims is not None else []
        group, created = groups.decide(t_task)
        groups.update(group, t)
        group_of[name] = group
        print(f"{name:13s} -> group {group} ({'new' if created else 'joined'}); best cosines "
              + ", ".join(f"{v:.2f}" for v in top)
              + (f"; margin {top[0] - top[1]:.2f} (theta {cfg.theta})" if len(top) == 2 else ""))
    protos = groups.prototypes
    pn = protos / protos.norm(dim=-1, keepdim=True)
    print("prototype cosines:\n", (pn @ pn.T).numpy().round(2))
    for name in order:
        assigned = groups.assign(encoder.encode(tests[name]))
        share = float((assigned == group_of[name]).float().mean()) * 100
        print(f"{name:13s} test records in own group: {share:.1f}%  groups seen {sorted(set(assigned.tolist()))}")


if __name__ == "__main__":
    import argparse

    from cramcl.data.builtin import choice

    ap = argparse.ArgumentParser()
    ap.add_argument("--stem", default=choice.STEM)
    ap.add_argument("--tail", default=choice.TAIL)
    ap.add_argument("--digit-first", action="store_true", help="swap mc-shape and mc-digit in the order")
    ap.add_argument("--second", default="mc-digit", help="the MC task in mc-digit's place (e.g. mc-corner-fixed)")
    ap.add_argument("--stream", action="store_true", help="the built-in stream as it ships (its order and stem)")
    args = ap.parse_args()
    choice.STEM, choice.TAIL = args.stem, args.tail
    order = tuple(args.second if n == "mc-digit" else n for n in ORDER)
    if args.digit_first:
        swap = {"mc-shape": "mc-digit", "mc-digit": "mc-shape"}
        order = tuple(swap.get(n, n) for n in ORDER)
    torch.set_num_threads(1)
    if not args.stream:
        print(f"stem {choice.STEM!r}, tail {choice.TAIL!r}")
    main(order, args.stream)
