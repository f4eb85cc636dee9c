"""What a reader gets from the offline model: a real research-worker report over tests/corpus, read as a user
reads it (no repeated sentences, no headings glued into sentences, introduction and conclusion that
summarise, distinct analysts and sections, citations that resolve), and the pieces behind it over HTTP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from offline_model.launcher import ModelServerProcess
from research_api import prompts
from research_worker.state import Analyst, Perspectives  # the schemas the real worker asks for

CORPUS = Path(__file__).parent / "corpus"
TOPIC = "How Kubernetes runs and limits batch workloads"
BOILERPLATE = ("determine", "based", "documents", "feedback", "analyst personas", "theme")
HEADINGS = sorted(
    {m.group(1).strip() for p in CORPUS.glob("*.md") for m in re.finditer(r"^#{1,3}\s+(.+)$", p.read_text(), re.M)}
)


def llm(server: ModelServerProcess) -> ChatOpenAI:
    return ChatOpenAI(base_url=server.base_url, api_key="x", model="offline-research-1", timeout=30)  # type: ignore[arg-type]


def sentences(markdown: str) -> list[str]:
    """The prose sentences of a Markdown text, citation markers and emphasis removed."""
    out = []
    for line in markdown.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "---", "[")):
            continue
        line = re.sub(r"\s*\[\d+\]", "", line).replace("*", "")
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9])", line) if len(s.split()) >= 3]
    return out


def part(md: str, heading: str) -> str:
    """The text under ``## heading`` up to the next ``---`` rule or ``##`` heading."""
    m = re.search(rf"^## {heading}\s*\n(.*?)(?=^---|^## |\Z)", md, re.M | re.S)
    assert m, f"no {heading} in the report"
    return m.group(1)


@pytest.fixture(scope="module")
def worker_run(modelserver: ModelServerProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The worker's ``run`` step (create analysts, interviews, sections, report) against the model server."""
    tmp = tmp_path_factory.mktemp("quality")
    task = {
        "job": {"namespace": "research", "name": "rj-quality", "uid": str(uuid.uuid4())},
        "topic": TOPIC,
        "maxAnalysts": 3,
        "maxTurns": 2,
        "model": {"name": "offline-research-1", "baseUrl": modelserver.base_url, "maxConcurrency": 2},
        "sources": [{"type": "documents", "path": str(CORPUS)}],
    }
    (tmp / "task.json").write_text(json.dumps(task))
    r = subprocess.run(
        [sys.executable, "-m", "research_worker.cli", "run", "--task", str(tmp / "task.json"),
         "-o", str(tmp / "report.md"), "--sections-dir", str(tmp / "sections")],
        capture_output=True, text=True, env={**os.environ, "OPENAI_API_KEY": "sk-test"}, timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    sections = [json.loads(p.read_text()) for p in sorted((tmp / "sections").glob("section-*.json"))]
    return {"report": (tmp / "report.md").read_text(), "sections": sections}


def test_report_never_repeats_a_sentence(worker_run: dict[str, Any]) -> None:
    said = sentences(worker_run["report"].split("\n## Sources", 1)[0])
    assert len(said) >= 10
    repeated = sorted({s for s in said if said.count(s) > 1})
    assert not repeated, f"repeated in the report: {repeated}"


def test_report_has_no_heading_glued_to_a_sentence(worker_run: dict[str, Any]) -> None:
    md = worker_run["report"]
    assert "completion modes A Kubernetes" not in md
    for heading in HEADINGS:  # "Compute quotas A quota such as ..." is a heading run into its paragraph
        assert not re.search(rf"{re.escape(heading)}\s+[A-Z]", md), heading
    for s in worker_run["sections"]:
        for heading in HEADINGS:
            assert not re.search(rf"{re.escape(heading)}\s+[A-Z]", s["summary"]), (heading, s["summary"])


def test_introduction_and_conclusion_summarise_the_sections(worker_run: dict[str, Any]) -> None:
    md = worker_run["report"]
    intro, conclusion = sentences(part(md, "Introduction")), sentences(part(md, "Conclusion"))
    assert len(set(intro)) >= 2 and len(set(conclusion)) >= 2
    titles = [s["title"] for s in worker_run["sections"]]
    assert all(t in part(md, "Introduction") for t in titles), "the introduction names every section"
    assert not re.search(r"\bin How\b", md), "no '<theme> in <Topic>' filler"
    title = md.splitlines()[0]
    assert title == "# How Kubernetes Runs and Limits Batch Workloads"


def test_analysts_have_distinct_sensible_roles(worker_run: dict[str, Any]) -> None:
    analysts = [s["analyst"] for s in worker_run["sections"]]
    roles = [a["role"] for a in analysts]
    assert len(analysts) == 3 and len(set(roles)) == 3, roles
    assert len({a["affiliation"] for a in analysts}) == 3 and len({a["name"] for a in analysts}) == 3
    for a in analysts:
        assert not any(w in a["role"].lower() for w in BOILERPLATE), a["role"]
        assert not any(re.search(rf"\b{w}\b", a["description"].lower()) for w in BOILERPLATE), a["description"]
        assert "Kubernetes" in a["description"]


def test_sections_differ(worker_run: dict[str, Any]) -> None:
    sections = worker_run["sections"]
    titles = [s["title"] for s in sections]
    assert len(set(titles)) == len(titles), titles
    assert all(TOPIC.lower() not in t.lower() for t in titles), "a section is titled by its focus, not the topic"
    said = [set(sentences(s["summary"])) for s in sections]
    for i in range(len(said)):
        for j in range(i + 1, len(said)):
            shared = len(said[i] & said[j]) / min(len(said[i]), len(said[j]))
            assert shared < 0.5, (titles[i], titles[j], said[i] & said[j])


def test_every_citation_resolves_to_the_sources_list(worker_run: dict[str, Any]) -> None:
    body, listing = worker_run["report"].split("\n## Sources\n", 1)
    listed = [int(n) for n in re.findall(r"^\[(\d+)\] \S", listing, re.M)]
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", body)}
    assert listed == list(range(1, len(listed) + 1)) and cited and cited <= set(listed)
    assert cited & {int(n) for n in re.findall(r"\[(\d+)\]", part(worker_run["report"], "Introduction"))}


def analysts_for(server: ModelServerProcess, feedback: str, n: int = 3) -> list[Analyst]:
    system = prompts.analyst_instructions.format(topic=TOPIC, human_analyst_feedback=feedback, max_analysts=n)
    result = (
        llm(server)
        .with_structured_output(Perspectives, method="json_schema")
        .invoke([SystemMessage(system), HumanMessage(prompts.analyst_request)])
    )
    assert isinstance(result, Perspectives)
    return result.analysts


def test_personas_come_from_the_topic_not_the_prompt(modelserver: ModelServerProcess) -> None:
    analysts = analysts_for(modelserver, "", 4)
    assert len({a.role for a in analysts}) == 4
    text = " ".join(f"{a.role} {a.description}" for a in analysts).lower()
    assert not any(re.search(rf"\b{w}\b", text) for w in BOILERPLATE)
    assert "runs" in text and "limits" in text  # the topic's own words, not a table of computing lenses
    assert analysts == analysts_for(modelserver, "", 4), "same request, same analysts"


def test_feedback_gets_its_own_analyst(modelserver: ModelServerProcess) -> None:
    analysts = analysts_for(modelserver, "Add an analyst focused on cost and quotas")
    first = f"{analysts[0].role} {analysts[0].description}".lower()
    assert "cost" in first and "quota" in first
    assert len({a.role for a in analysts}) == 3
    assert not any(w in a.role.lower() for a in analysts for w in BOILERPLATE)


CONTEXT = """<context>
<Document n="1" source="resource-quota.md"/>
Compute quotas
A quota such as requests.cpu 4 and limits.memory 8Gi sums the requests and limits of all non-terminal pods. When a
quota constrains compute resources, every new pod must declare those requests or limits, or admission rejects it.
Object count quotas
A quota can also count objects, for example count/jobs.batch 20, which protects the API server from one tenant.
</Document>
<Document n="2" source="requests-limits-qos.md"/>
CPU and memory behave differently
A container that exceeds its memory limit is killed by the out-of-memory killer and shows the reason OOMKilled.
- A container that exceeds its CPU limit is throttled: it keeps running but gets fewer CPU periods.
- A container that exceeds its CPU limit is throttled: it keeps running but gets fewer CPU periods.
</Document>
</context>"""
PERSONA = (
    "Name: Ada Chen\nRole: Quota and Fairness Analyst\nAffiliation: Lab\nDescription: Focuses on resource quotas "
    "in batch clusters. Wants to know how quotas cap memory and CPU; what happens to pods over their limits.\n"
)


def test_expert_answers_with_distinct_cited_sentences(modelserver: ModelServerProcess) -> None:
    system = prompts.answer_instructions.format(goals=PERSONA, context=CONTEXT)
    opening = HumanMessage(prompts.interview_opening.format(topic=TOPIC))
    asked = AIMessage("Hello, I'm Ada Chen. What happens to a container that exceeds its CPU or memory limit?")
    text = str(llm(modelserver).invoke([SystemMessage(system), opening, asked]).content)
    body, listing = text.split("\n## Sources\n")
    said = sentences(body)
    assert 2 <= len(said) <= 4 and len(set(said)) == len(said), said
    assert all(re.search(r"\[\d\]\.$", s) for s in re.split(r"(?<=\.)\s+", body.strip())), body
    assert "behave differently A" not in text and "Compute quotas A" not in text
    assert "resource-quota.md" in listing or "requests-limits-qos.md" in listing


def test_questions_move_through_the_analysts_concerns(modelserver: ModelServerProcess) -> None:
    system = prompts.question_instructions.format(goals=PERSONA)
    model = llm(modelserver)
    messages: list[Any] = [HumanMessage(prompts.interview_opening.format(topic=TOPIC))]
    first = str(model.invoke([SystemMessage(system), *messages]).content)
    answer = "A quota such as requests.cpu 4 sums the requests of all pods [1].\n\nSources:\n[1] resource-quota.md"
    messages += [AIMessage(first), HumanMessage(answer)]
    second = str(model.invoke([SystemMessage(system), *messages]).content)
    assert first.startswith("Hello, I'm Ada Chen") and "quotas cap memory and CPU" in first
    assert "over their limits" in second and second != first


def test_context_words_do_not_change_the_kind(modelserver: ModelServerProcess) -> None:
    """An expert prompt whose documents talk about memory, memos, reports, personas and introductions is
    still an answer: only the instructions decide the kind."""
    context = (
        '<context>\n<Document n="1" source="notes.md"/>\nThe memo in the report says memory limits matter. Create a '
        "persona for the introduction and conclusion of the sections.\n</Document>\n</context>"
    )
    system = prompts.answer_instructions.format(goals=PERSONA, context=context)
    modelserver.reset()
    llm(modelserver).invoke([SystemMessage(system), HumanMessage("What does the memo say about memory limits?")])
    assert modelserver.stats()["by_kind"]["answer"] == 1


class Claim(BaseModel):
    claim: str = Field(description="A claim the text makes.")
    quote: str = Field(description="The sentence of the text that supports the claim, quoted exactly.")
    source: str = Field(description="Where the quote comes from.")


class Review(BaseModel):
    summary: str = Field(description="A one-sentence summary of the text.")
    claims: list[Claim] = Field(description="The main claims, each with its supporting quote and source.")


REVIEW_INSTRUCTIONS = (
    "You are a careful reviewer. Read the text the user gives you and extract its main claims. For each claim, "
    "quote exactly the sentence that supports it and say which source it comes from. Be precise, do not invent "
    "anything, and keep the summary to one sentence."
)


@pytest.mark.parametrize("as_document", [True, False])
def test_structured_fields_come_from_the_content_not_the_instructions(
    modelserver: ModelServerProcess, as_document: bool
) -> None:
    folder = Path(__file__).parent / "corpora" / "honeybee-swarming" / "docs"
    text = (folder / "scout-bees-and-the-new-home.md").read_text()
    given = f'<Document source="scouts.md"/>\n{text}\n</Document>' if as_document else text
    review = (
        llm(modelserver)
        .with_structured_output(Review, method="json_schema")
        .invoke([SystemMessage(REVIEW_INSTRUCTIONS), HumanMessage(given)])
    )
    assert isinstance(review, Review) and review.claims
    flat = re.sub(r"\s+", " ", text)
    for value in [review.summary] + [c.claim for c in review.claims] + [c.quote for c in review.claims]:
        assert value.rstrip(".") in flat, f"not from the text: {value!r}"
    for c in review.claims:
        assert c.source == ("scouts.md" if as_document else "Scout bees and the new home"), c.source
