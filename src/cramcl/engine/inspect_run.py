"""`cramcl inspect`: adapted modules, parameter counts and a method's routing state, as text."""
from __future__ import annotations

import tempfile
from pathlib import Path

from cramcl.config import resolve_config
from cramcl.engine.session import open_finished_run, open_session
from cramcl.errors import BadInputError


def _modules_table(method) -> str:
    lines = ["| module | in | out | experts | ranks |", "|---|---|---|---|---|"]
    for key, layer in method.layers.items():
        lines.append(f"| {key} | {layer.in_features} | {layer.out_features} | {layer.num_experts} | {layer.ranks} |")
    return "\n".join(lines)


def _counts(method) -> str:
    c = method.param_counts()
    return (f"adapted modules: {len(method.layers)}\nstored adapter parameters: {c['stored']:,}\n"
            f"active per sample: {c['active_per_sample']:,}")


def inspect_config(config_file: str | None, overrides: list[str], method: str | None = None,
                   profile: str | None = None) -> str:
    cfg = resolve_config(method=method, profile=profile, config_file=config_file, overrides=overrides)

    with tempfile.TemporaryDirectory() as tmp:
        session = open_session(cfg, Path(tmp), log=lambda *a: None)
    m = session.method
    return "\n".join([f"method: {cfg.method} (profile {cfg.profile})", _counts(m), _modules_table(m)])


def inspect_run(run_dir: Path, record_id: str | None = None) -> str:
    session, after, record = open_finished_run(run_dir, log=lambda *a: None)
    m = session.method
    parts = [f"run: {run_dir}  method: {session.cfg.method}  checkpoint: after task {after} "
             f"({record.tasks[after]})", _counts(m)]
    parts += [f"## {title}\n{body}" for title, body in m.report_sections()]
    if record_id is not None:
        found = [(t, r) for t in session.bench.tasks for r in t.test if r.id == record_id]
        if not found:
            raise BadInputError(f"--record: no test record with id '{record_id}' in {session.bench.path}")
        task, record = found[0]
        describe = getattr(m, "describe_routing", None)
        if describe is None:
            parts.append(f"record {record_id} ({task.name}): {m.name} does not route")
        else:
            session.backbone.prepare([record])
            parts.append(describe(session.backbone.collate([record], train=False)))
    parts.append(_modules_table(m))
    return "\n\n".join(parts)
