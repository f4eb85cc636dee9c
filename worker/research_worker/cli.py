"""``research-worker <step>``: the entry point worker Jobs run.

Steps: ``plan``, ``interview``, ``write`` (through a store), and ``run`` (everything in this
process, no cluster, report to a file or stdout). The task is JSON or YAML from ``--task PATH``,
``--task-configmap NAMESPACE/NAME[:KEY]`` or the ``RESEARCH_TASK`` variable. Errors are one line on
stderr; exit codes: 0 done, 1 unexpected, 2 bad task/config, 3 model endpoint/key, 4 store,
5 token budget, 6 search.

Two more commands need no model: ``cleanup`` deletes every PostgreSQL row and checkpoint of a
ResearchJob (``--job-uid`` or the task's), and ``show-report`` prints a stored report from either
store (``--job NAMESPACE/NAME``, ``--postgres-id UID/PLAN`` or the task).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from research_api import tracing as otel
from research_api.environment import TASK_ENV
from research_api.names import parse_postgres_report_id
from research_api.task import (
    DEFAULT_DSN_ENV,
    PostgresStoreSettings,
    ResearchTask,
    Step,
)
from research_worker import tracing
from research_worker.errors import WorkerConfigError, WorkerError
from research_worker.stopping import DRAIN_SECONDS, Stop

SHOW_REPORT = "show-report"
log = logging.getLogger("research_worker")


def parse_task_text(text: str, origin: str) -> ResearchTask:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WorkerConfigError(f"task from {origin} is not JSON/YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise WorkerConfigError(f"task from {origin} is not a mapping")
    try:
        return ResearchTask.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'task'}: {e['msg']}" for e in exc.errors()[:5])
        raise WorkerConfigError(f"invalid task from {origin}: {problems}") from None


def load_task(args: argparse.Namespace) -> ResearchTask:
    if args.task:
        path = Path(args.task)
        try:
            return parse_task_text(path.read_text(), str(path))
        except OSError as exc:
            raise WorkerConfigError(f"cannot read task file {path}: {exc.strerror}") from None
    if args.task_configmap:
        ref, _, key = args.task_configmap.partition(":")
        ns, _, name = ref.rpartition("/")
        if not ns or not name:
            raise WorkerConfigError("--task-configmap wants NAMESPACE/NAME[:KEY]")
        from research_worker.store import kube_api_client, load_configmap_data

        data = load_configmap_data(kube_api_client(), ns)(name)
        if not data:
            raise WorkerConfigError(f"ConfigMap {ns}/{name} holds no task")
        key = key or next(iter(sorted(data)))
        if key not in data:
            raise WorkerConfigError(f"ConfigMap {ns}/{name} has no key {key}")
        return parse_task_text(data[key], f"ConfigMap {ns}/{name}:{key}")
    text = os.environ.get(TASK_ENV)
    if text:
        return parse_task_text(text, f"${TASK_ENV}")
    raise WorkerConfigError(f"no task: give --task, --task-configmap or ${TASK_ENV}")


def _ask_on_terminal(analysts: list[dict[str, Any]]) -> str:
    for i, a in enumerate(analysts):
        print(f"[{i}] {a['name']} — {a['role']} ({a['affiliation']})\n    {a['description']}", file=sys.stderr)
    print("Feedback on the analysts (empty or 'approve' to continue): ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip()


def _dsn(env: str) -> str:
    dsn = os.environ.get(env)
    if not dsn:
        raise WorkerConfigError(f"the PostgreSQL DSN variable {env} is not set (feed it from a Secret)")
    return dsn


async def _cleanup(args: argparse.Namespace) -> int:
    from research_worker.store import delete_job_rows

    if args.job_uid:
        uid, dsn_env = args.job_uid, args.dsn_env or DEFAULT_DSN_ENV
    else:
        task = load_task(args)
        if not isinstance(task.store, PostgresStoreSettings):
            raise WorkerConfigError("cleanup is for the postgres store (ConfigMaps are garbage-collected)")
        uid, dsn_env = task.job.uid, args.dsn_env or task.store.dsn_env
    deleted = await delete_job_rows(_dsn(dsn_env), uid)
    log.info("deleted the PostgreSQL rows of job uid %s: %s", uid, deleted)
    print(json.dumps({"jobUid": uid, "deleted": deleted}))
    return 0


async def _show_report(args: argparse.Namespace) -> int:
    """Print a stored report: from a ResearchJob's status.report, a PostgreSQL report id, or a task."""
    from research_worker.store import ConfigMapStore, kube_api_client, read_postgres_report

    dsn_env = args.dsn_env or DEFAULT_DSN_ENV
    if args.job:
        ns, _, name = args.job.rpartition("/")
        if not ns or not name:
            raise WorkerConfigError("--job wants NAMESPACE/NAME")
        api_client = kube_api_client()
        ref = await asyncio.to_thread(_report_ref, api_client, ns, name)
        if ref.get("postgresId"):
            uid, plan = parse_postgres_report_id(str(ref["postgresId"]))
            report = await read_postgres_report(_dsn(dsn_env), uid, plan)
            if report is None:
                raise WorkerConfigError(f"report {ref['postgresId']} of {ns}/{name} is not in PostgreSQL")
            text = report.markdown
        else:
            text = await asyncio.to_thread(_configmap_report, api_client, ns, name, ref)
    elif args.postgres_id:
        try:
            uid, plan = parse_postgres_report_id(args.postgres_id)
        except ValueError as exc:
            raise WorkerConfigError(str(exc)) from None
        report = await read_postgres_report(_dsn(dsn_env), uid, plan)
        if report is None:
            raise WorkerConfigError(f"no report {args.postgres_id} in PostgreSQL")
        text = report.markdown
    else:
        task = load_task(args)
        if isinstance(task.store, PostgresStoreSettings):
            report = await read_postgres_report(_dsn(args.dsn_env or task.store.dsn_env), task.job.uid, task.plan_id)
        else:
            report = await ConfigMapStore(task, kube_api_client()).load_report()
        if report is None:
            job = f"{task.job.namespace}/{task.job.name}"
            raise WorkerConfigError(f"no report is stored for plan {task.plan_id} of {job}")
        text = report.markdown
    _emit(args.output, text if text.endswith("\n") else text + "\n")
    return 0


def _report_ref(api_client: Any, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from research_api.researchjob import GROUP, PLURAL, VERSION

    try:
        rj = client.CustomObjectsApi(api_client).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        raise WorkerConfigError(f"cannot read ResearchJob {namespace}/{name}: HTTP {exc.status} {exc.reason}") from None
    status: dict[str, Any] = dict(rj.get("status") or {}) if isinstance(rj, dict) else {}
    ref = status.get("report")
    if not ref:
        raise WorkerConfigError(
            f"ResearchJob {namespace}/{name} has no report yet (phase {status.get('phase', 'Pending')})"
        )
    return dict(ref)


def _configmap_report(api_client: Any, namespace: str, name: str, ref: dict[str, Any]) -> str:
    from research_worker.store import load_configmap_data

    if not ref.get("configMap") or not ref.get("key"):
        raise WorkerConfigError(f"ResearchJob {namespace}/{name} names no report: {ref}")
    data = load_configmap_data(api_client, namespace)(str(ref["configMap"]))
    if ref["key"] not in data:
        raise WorkerConfigError(f"ConfigMap {namespace}/{ref['configMap']} has no key {ref['key']}")
    return data[str(ref["key"])]


async def _main(args: argparse.Namespace) -> int:
    if args.step == SHOW_REPORT:
        return await _show_report(args)
    if args.step == Step.CLEANUP.value:
        return await _cleanup(args)
    task = load_task(args)
    step = Step(args.step)
    if task.step is not None and task.step != step:
        raise WorkerConfigError(f"the task is for step {task.step.value}, not {step.value}")
    with tracing.pod(task, step.value):
        return await _step(args, task, step)


async def _step(args: argparse.Namespace, task: ResearchTask, step: Step) -> int:
    from research_worker import steps
    from research_worker.store import kube_api_client, load_configmap_data, opened, usage_of_results

    if args.analysts is not None:
        task = task.model_copy(update={"analysts": [int(x) for x in args.analysts.split(",") if x.strip()]})
        task = ResearchTask.model_validate(task.model_dump())
    needs_cluster = any(getattr(s, "config_map", None) for s in task.sources) or (
        step != Step.RUN
        and (task.store.type == "configmap" or (isinstance(task.store, PostgresStoreSettings) and task.store.markers))
    )
    api_client = kube_api_client() if needs_cluster else None
    loader = load_configmap_data(api_client, task.job.namespace) if api_client is not None else None

    stop = Stop()
    stop.install()  # SIGTERM (a pod delete, preemption, eviction): stop calling the model, keep what is stored
    if step == Step.RUN:
        rt = await steps.prepare(task, load_configmap=loader)
        rt.llm.stop = stop
        result = await steps.run(rt, ask_feedback=_ask_on_terminal if args.review else None)
        report = result.report
        if args.sections_dir:
            _write_sections(Path(args.sections_dir), result.sections)
        _emit(args.output, report.markdown)
        _emit_usage(args.usage_file, {"run": report.usage.model_dump()})
        _emit_quality(args.quality_file, report)
        log.info("report written: %d sources, %d tokens", len(report.sources), report.usage.total_tokens)
        return 0

    async with opened(task, api_client) as store, contextlib.AsyncExitStack() as stack:
        if store.checkpointer() is not None:
            stop.drain_seconds = DRAIN_SECONDS  # a finished call's node is checkpointed: worth finishing
        used = sum(u.total_tokens for u in (await store.usage()).values())
        rt = await steps.prepare(task, tokens_used_before=used, load_configmap=loader)
        rt.llm.stop = stop
        share_ref = task.model.share
        if share_ref is not None and rt.llm.share is not None and api_client is not None:
            from research_worker.share import follow

            shares_loader = load_configmap_data(api_client, task.job.namespace)
            poller = asyncio.create_task(follow(rt.llm.share, share_ref, shares_loader), name="endpoint share")
            stack.callback(poller.cancel)
            if share_ref.broker_url and share_ref.endpoint:
                from research_worker.leases import LeaseClient, broker_token

                rt.llm.leases = LeaseClient(share_ref, rt.llm.share, broker_token, ca=task.model.broker_ca)
                rt.llm.leases.unstored = rt.llm.unstored
                await rt.llm.leases.start()
                stack.push_async_callback(rt.llm.leases.close)
        if step == Step.PLAN:
            plan = await steps.plan(rt, store)
            print(json.dumps({"analysts": [a.model_dump() for a in plan.analysts]}))
        if step == Step.INTERVIEW or (step == Step.PLAN and task.continue_steps and task.analysts):
            outcome = await steps.interview(rt, store)
            print(json.dumps({"written": outcome.written, "skipped": outcome.skipped}))
        if step == Step.WRITE:
            report = await steps.write(rt, store)
            if args.output:
                _emit(args.output, report.markdown)
            if args.sections_dir:
                _write_sections(Path(args.sections_dir), await store.list_sections())
            _emit_quality(args.quality_file, report)
            print(json.dumps({"sources": len(report.sources), "sections": report.sections}))
        elif task.continue_steps:
            await _write_if_last(rt, store)
        if args.usage_file:
            plan_, sections, report_ = (
                await store.load_analysts(),
                await store.list_sections(),
                await store.load_report(),
            )
            _emit_usage(
                args.usage_file, {k: v.model_dump() for k, v in usage_of_results(plan_, sections, report_).items()}
            )
    return 0


def _emit_quality(path: str | None, report: Any) -> None:
    """Log the report's quality in one line and, with --quality-file, write it there as JSON."""
    q = report.quality
    if q is None:
        return
    log.info("quality: %s", q.figures())
    if path:
        Path(path).write_text(q.model_dump_json(indent=2) + "\n", encoding="utf-8")


async def _write_if_last(rt: Any, store: Any) -> None:
    """Write the report in this pod if it stored the plan's last section. Its own step is done by
    then, so a failure here only leaves the report to the writer Job the operator then starts."""
    from research_worker import steps

    holder = os.environ.get("HOSTNAME") or socket.gethostname()
    try:
        report = await steps.write_if_last(rt, store, holder)
    except WorkerError as exc:
        log.warning("writing the report in this pod failed, the operator's writer Job will: %s", exc)
        return
    if report is not None:
        print(json.dumps({"sources": len(report.sources), "sections": report.sections}))


def _emit(output: str | None, text: str) -> None:
    if output and output != "-":
        Path(output).write_text(text)
    else:
        sys.stdout.write(text)


def _write_sections(folder: Path, sections: list[Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s in sections:
        (folder / f"section-{s.index:03d}.json").write_text(s.model_dump_json(indent=2))


def _emit_usage(path: str | None, usage: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(usage, indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="research-worker", description="Run one step of a ResearchJob.")
    p.add_argument(
        "step",
        choices=[*(s.value for s in Step), SHOW_REPORT],
        help="plan | interview | write | run | cleanup | show-report",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", help="task file (JSON or YAML)")
    src.add_argument("--task-configmap", metavar="NS/NAME[:KEY]", help="read the task from a ConfigMap")
    src.add_argument("--job-uid", help="cleanup: the ResearchJob uid whose PostgreSQL rows to delete (no task needed)")
    src.add_argument("--job", metavar="NS/NAME", help="show-report: the report a ResearchJob's status names")
    src.add_argument("--postgres-id", metavar="UID/PLAN", help="show-report: a report in the PostgreSQL store")
    p.add_argument("--dsn-env", help=f"cleanup/show-report: the variable holding the DSN (default {DEFAULT_DSN_ENV})")
    p.add_argument("--analysts", help="interview: comma-separated analyst indices (overrides the task's)")
    p.add_argument(
        "-o", "--output", help="run/write/show-report: write the report here ('-' = stdout, the default for run)"
    )
    p.add_argument("--sections-dir", help="run/write: also write each section as JSON into this folder")
    p.add_argument("--usage-file", help="write token usage by step/analyst as JSON here")
    p.add_argument("--quality-file", help="run/write: write the report's quality figures as JSON here")
    p.add_argument("--review", action="store_true", help="run: show the analysts and ask for feedback on stdin")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpx2", "openai", "httpcore", "urllib3", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.step in (Step.PLAN.value, Step.INTERVIEW.value, Step.WRITE.value, Step.RUN.value):
        otel.start("research-worker")  # only when OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_TRACES_EXPORTER say so
    try:
        return asyncio.run(_main(args))
    except WorkerError as exc:
        print(f"research-worker {args.step}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"research-worker {args.step}: interrupted", file=sys.stderr)
        return 130
    finally:
        otel.shutdown()  # the spans still buffered go out before the pod ends


if __name__ == "__main__":
    sys.exit(main())
