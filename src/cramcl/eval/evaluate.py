"""Evaluate a method on test records: batched greedy generation, scoring, per-record predictions.

The evaluation path never receives a task id: the method routes each batch from its inputs alone
(``prepare_batch(batch, train=False)``). Records are sharded across processes and gathered back; the
gathered count is asserted so no record is dropped or duplicated.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate.utils import gather_object
from cramcl.utils.progress import bar as progress_bar

from cramcl.engine.kill_points import kill_point
from cramcl.engine.loader import make_loader
from cramcl.eval.scorers import score_task


@torch.no_grad()
def predict(accelerator, backbone, method, records, batch_size: int, desc: str = "eval",
            task_ids: list[int] | None = None, loader_workers: int = 0) -> list[str]:
    """Predictions for ``records`` in their order (sharded over processes, gathered, count checked).

    ``task_ids`` (one stream index per record) reach the method, as ``batch["task_index"]`` (B,), only if
    it declares ``uses_task_id_at_eval`` (oracle bounds). ``loader_workers``: processes building the batches
    (see engine/loader.py); batches are pinned and copied asynchronously on a GPU."""
    model = accelerator.unwrap_model(backbone.model)
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(records), world))
    chunks = [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]
    on_gpu = accelerator.device.type == "cuda"
    loader = make_loader(records, chunks, batch_size, backbone, train=False, workers=loader_workers, pin=on_gpu)
    local = []
    batches = progress_bar(zip(chunks, loader), total=len(chunks), desc=desc,
                           disable=not accelerator.is_local_main_process, leave=False)
    for idx, batch in batches:
        batch = {k: (v.to(accelerator.device, non_blocking=on_gpu) if torch.is_tensor(v) else v)
                 for k, v in batch.items()}
        if method.uses_task_id_at_eval:
            if task_ids is None:
                raise RuntimeError(f"{type(method).__name__} routes by the task id: predict() needs task_ids")
            batch["task_index"] = torch.tensor([task_ids[i] for i in idx], device=accelerator.device)
        method.prepare_batch(batch, train=False)
        local.extend(zip(idx, backbone.generate(model, batch)))
        kill_point("eval_batch")
    gathered = gather_object(local) if world > 1 else local
    by_index = dict(gathered)
    if len(by_index) != len(records) or len(gathered) != len(records):
        raise RuntimeError(f"evaluation gathered {len(gathered)} predictions for {len(records)} records")
    return [by_index[i] for i in range(len(records))]


def score_records(scorer: str, records, predictions: list[str],
                  params: dict | None = None) -> tuple[float, list[dict]]:
    """Task score (0-100) and one row per record (id, prediction, reference, score). The scorer gets every
    answer a record lists (repeats included: vqa_soft counts them), its question and its ``params``."""
    refs = [list(r.answers) if getattr(r, "answers", ()) else r.answer for r in records]
    questions = [getattr(r, "question", "") or "" for r in records]
    score, per_record = score_task(scorer, predictions, refs, questions=questions, params=params)
    rows = [{"id": r.id, "prediction": p, "reference": r.answer, "score": s}
            for r, p, s in zip(records, predictions, per_record)]
    return score, rows


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
