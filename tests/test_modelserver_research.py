"""The research assistant's roles (analyst, expert, writers) recognised by prompt wording, end to end.

The prompts below are the LangChain Academy research assistant's own (module 4), as a user who brings the
standard prompts sends them; they are deliberately not the worker's (research_api.prompts, which adds rules
for untrusted data), and the Academy section further down imports the worker's where the text is the same.
The model server must play every role from the context in the messages, keep citations, and end interviews on
its own.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from offline_model.launcher import ModelServerProcess
from research_api import prompts as worker_prompts
from research_worker.search import DocumentsBackend
from research_worker.state import Analyst, Perspectives  # the schemas the real worker asks for

TOPIC = "Running LangGraph research agents on Kubernetes"

DOCS = [
    (
        "docs/checkpointing.md",
        "",
        "LangGraph persists graph state with checkpointers. A PostgreSQL checkpointer "
        "lets an interview resume on another pod after a crash. Each thread id keys one conversation's checkpoints.",
    ),
    (
        "docs/quotas.md",
        "2",
        "A ResourceQuota caps the CPU, memory and number of Jobs in a namespace. When the "
        "quota is exhausted, the operator keeps interview Jobs pending instead of failing them. Fair admission "
        "shares the quota between research jobs.",
    ),
    (
        "https://example.org/cost",
        "",
        "Model calls dominate the cost of a research job. Caching answers and "
        "limiting interview turns cut token usage by half in the reported experiment.",
    ),
]

QUESTION_PROMPT = """You are an analyst tasked with interviewing an expert to learn about a specific topic.

Your goal is boil down to interesting and specific insights related to your topic.

1. Interesting: Insights that people will find surprising or non-obvious.

2. Specific: Insights that avoid generalities and include specific examples from the expert.

Here is your topic of focus and set of goals: {goals}

Begin by introducing yourself using a name that fits your persona, and then ask your question.

Continue to ask questions to drill down and refine your understanding of the topic.

When you are satisfied with your understanding, complete the interview with: "Thank you so much for your help!"

Remember to stay in character throughout your response, reflecting the persona and goals provided to you."""

SEARCH_PROMPT = """You will be given a conversation between an analyst and an expert.

Your goal is to generate a well-structured query for use in retrieval and / or web-search related to the conversation.

First, analyze the full conversation.

Pay particular attention to the final question posed by the analyst.

Convert this final question into a well-structured web search query"""

ANSWER_PROMPT = """You are an expert being interviewed by an analyst.

Here is analyst area of focus: {goals}.

You goal is to answer a question posed by the interviewer.

To answer question, use this context:

{context}

When answering questions, follow these guidelines:

1. Use only the information provided in the context.

2. Do not introduce external information or make assumptions beyond what is explicitly stated in the context.

3. The context contain sources at the topic of each individual document.

4. Include these sources your answer next to any relevant statements. For example, for source # 1 use [1].

5. List your sources in order at the bottom of your answer. [1] Source 1, [2] Source 2, etc

6. If the source is: <Document source="assistant/docs/llama3_1.pdf" page="7"/>' then just list:

[1] assistant/docs/llama3_1.pdf, page 7

And skip the addition of the brackets as well as the Document source preamble in your citation."""

SECTION_PROMPT = """You are an expert technical writer.

Your task is to create a short, easily digestible section of a report based on a set of source documents.

1. Analyze the content of the source documents:
- The name of each source document is at the start of the document, with the <Document tag.

2. Create a report structure using markdown formatting:
- Use ## for the section title
- Use ### for sub-section headers

3. Write the report following this structure:
a. Title (## header)
b. Summary (### header)
c. Sources (### header)

4. Make your title engaging based upon the focus area of the analyst:
{focus}

5. For the summary section:
- Use numbered sources in your report (e.g., [1], [2]) based on information from source documents

6. In the Sources section:
- Include all sources used in your report

### Sources
[1] Link or Document name
[2] Link or Document name"""

REPORT_PROMPT = """You are a technical writer creating a report on this overall topic:

{topic}

You have a team of analysts. Each analyst has done two things:

1. They conducted an interview with an expert on a specific sub-topic.
2. They write up their finding into a memo.

Your task:

1. You will be given a collection of memos from your analysts.
4. Summarize the central points in each memo into a cohesive single narrative.

To format your report:

1. Use markdown formatting.
4. Start your report with a single title header: ## Insights
6. Preserve any citations in the memos, which will be annotated in brackets, for example [1] or [2].
7. Create a final, consolidated list of sources and add to a Sources section with the `## Sources` header.

Here are the memos from your analysts to build your report from:

{context}"""

INTRO_PROMPT = """You are a technical writer finishing a report on {topic}

You will be given all of the sections of the report.

You job is to write a crisp and compelling introduction or conclusion section.

The user will instruct you whether to write the introduction or conclusion.

For your introduction, create a compelling title and use the # header for the title.

Use ## Introduction as the section header.

For your conclusion, use ## Conclusion as the section header.

Here are the sections to reflect on: {sections}"""


class SearchQuery(BaseModel):
    search_query: str | None = Field(None, description="Search query for retrieval.")


def formatted(docs: list[tuple[str, str, str]]) -> str:
    return "\n\n---\n\n".join(f'<Document source="{s}" page="{p}"/>\n{t}\n</Document>' for s, p, t in docs)


def search(query: str) -> list[tuple[str, str, str]]:
    """A stand-in retriever: documents sharing a word with the query."""
    words = {w.lower() for w in re.findall(r"\w+", query) if len(w) > 3}
    return [d for d in DOCS if words & {w.lower() for w in re.findall(r"\w+", d[2])}] or DOCS[:1]


@pytest.fixture(scope="module")
def model(modelserver: ModelServerProcess) -> ChatOpenAI:
    return ChatOpenAI(base_url=modelserver.base_url, api_key="x", model="gpt-4o", timeout=30)  # type: ignore[arg-type]


def interview(model: ChatOpenAI, analyst: Analyst, max_turns: int = 5) -> tuple[list[BaseMessage], list[str]]:
    messages: list[BaseMessage] = [HumanMessage(f"So you said you were writing an article on {TOPIC}?")]
    context: list[str] = []
    for _ in range(max_turns):
        question = model.invoke([SystemMessage(QUESTION_PROMPT.format(goals=analyst.persona)), *messages])
        messages.append(AIMessage(str(question.content)))
        if "Thank you so much for your help" in str(question.content):
            break
        query = model.with_structured_output(SearchQuery).invoke([SystemMessage(SEARCH_PROMPT), *messages])
        assert isinstance(query, SearchQuery) and query.search_query
        context.append(formatted(search(query.search_query)))
        answer = model.invoke([SystemMessage(ANSWER_PROMPT.format(goals=analyst.persona, context=context)), *messages])
        messages.append(AIMessage(str(answer.content), name="expert"))
    return messages, context


def test_full_research_flow(model: ChatOpenAI, modelserver: ModelServerProcess) -> None:
    modelserver.reset()
    prompt = (
        "You are tasked with creating a set of AI analyst personas.\n\n1. First, review the research topic:\n"
        f"{TOPIC}\n\n2. Examine any editorial feedback:\n\nInclude a quota and cost perspective.\n\n"
        "4. Pick the top 2 themes."
    )
    plan = model.with_structured_output(Perspectives).invoke(
        [SystemMessage(prompt), HumanMessage("Generate the set of analysts.")]
    )
    assert isinstance(plan, Perspectives) and len(plan.analysts) == 2

    sections = []
    for analyst in plan.analysts:
        messages, context = interview(model, analyst)
        questions = [m.content for m in messages[1::2]]
        answers = [str(m.content) for m in messages if getattr(m, "name", None) == "expert"]
        assert str(questions[0]).startswith(f"Hello, I'm {analyst.name}")
        assert questions[-1] == "Thank you so much for your help!"  # the analyst ends the interview
        assert 1 <= len(answers) <= 4 and len(set(map(str, questions))) == len(questions)
        assert all("[1]" in a and re.search(r"## Sources\n\[1\] \S", a) for a in answers)
        section = model.invoke(
            [
                SystemMessage(SECTION_PROMPT.format(focus=analyst.description)),
                HumanMessage(f"Use this source to write your section: {context}"),
            ]
        )
        text = str(section.content)
        assert text.startswith("## ") and "\n### Summary\n" in text and "\n### Sources\n[1] " in text
        cited = {int(n) for n in re.findall(r"\[(\d+)\]", text.split("### Sources")[0])}
        listed = re.findall(r"^\[(\d+)\] (.+?)\s*$", text.split("### Sources")[1], re.M)
        assert cited == {int(n) for n, _ in listed}  # every marker resolves, nothing listed unused
        assert len({src for _, src in listed}) == len(listed)  # no duplicate sources
        assert all(
            src in {"docs/checkpointing.md", "docs/quotas.md, page 2", "https://example.org/cost"} for _, src in listed
        )
        sections.append(text)

    report = str(
        model.invoke(
            [
                SystemMessage(REPORT_PROMPT.format(topic=TOPIC, context="\n\n".join(sections))),
                HumanMessage("Write a report based upon these memos."),
            ]
        ).content
    )
    assert report.startswith("## Insights\n")
    body, sources = report.split("\n## Sources\n")
    assert "[1]" in body and sources.startswith("[1] ")
    formatted_sections = "\n\n".join(sections)
    intro = str(
        model.invoke(
            [
                SystemMessage(INTRO_PROMPT.format(topic=TOPIC, sections=formatted_sections)),
                HumanMessage("Write the report introduction"),
            ]
        ).content
    )
    conclusion = str(
        model.invoke(
            [
                SystemMessage(INTRO_PROMPT.format(topic=TOPIC, sections=formatted_sections)),
                HumanMessage("Write the report conclusion"),
            ]
        ).content
    )
    assert intro.startswith("# ") and "\n## Introduction\n" in intro and len(intro.split()) < 200
    assert conclusion.startswith("## Conclusion\n") and len(conclusion.split()) < 200

    kinds = modelserver.stats()["by_kind"]
    assert kinds["analysts"] == 1 and kinds["report"] == 1 and kinds["intro"] == 1 and kinds["conclusion"] == 1
    assert kinds["section"] == 2 and kinds["question"] >= 4
    assert kinds["search_query"] == kinds["answer"] >= 2


def test_answer_without_relevant_context_cites_nothing(model: ChatOpenAI) -> None:
    goals = "Name: Ada\nRole: Analyst\nAffiliation: Lab\nDescription: Focuses on GPUs.\n"
    answer = model.invoke(
        [
            SystemMessage(ANSWER_PROMPT.format(goals=goals, context=formatted(DOCS[:1]))),
            HumanMessage("So you said you were writing an article on GPUs?"),
            AIMessage("Which GPU vendors dominate inference hardware?"),
        ]
    )
    text = str(answer.content)
    assert text.startswith("The provided context does not contain information")
    assert "[1]" not in text


def test_search_query_is_the_last_question_terms(model: ChatOpenAI) -> None:
    q = model.with_structured_output(SearchQuery).invoke(
        [
            SystemMessage(SEARCH_PROMPT),
            HumanMessage("So you said you were writing an article on quotas?"),
            AIMessage("Hello, I'm Ada. How does fair admission share a ResourceQuota between research jobs?"),
        ]
    )
    assert isinstance(q, SearchQuery) and q.search_query
    words = q.search_query.split()
    assert {"fair", "admission", "ResourceQuota"} <= set(words) and "Ada" not in words


# ------------------------------------------------------------------------------------------------------------
# The LangChain Academy research assistant (module 4, research_assistant.py) as published, message shapes
# included: its intro/conclusion instructions are a bare string in ``llm.invoke([instructions, HumanMessage])``,
# which LangChain sends as a *user* message; its contexts are Python lists pasted into prompts with str().
# The worker's prompts are the same text where the worker did not change them, so they are imported; the
# expert's prompt differs (the worker adds an untrusted-data rule), so the original (ANSWER_PROMPT) is used.

CORPORA = Path(__file__).parent / "corpora"


def academy_report(model: ChatOpenAI, topic: str, docs_folder: Path, n_analysts: int = 3) -> str:
    backend = DocumentsBackend.from_folder(docs_folder, top_k=2)

    def search_wikipedia_style(query: str) -> str:
        found = [p for _, p in backend.rank(query)]
        return "\n\n---\n\n".join(f'<Document source="{p.source}" page=""/>\n{p.content}\n</Document>' for p in found)

    system = worker_prompts.analyst_instructions.format(topic=topic, human_analyst_feedback="", max_analysts=n_analysts)
    plan = model.with_structured_output(Perspectives).invoke(
        [SystemMessage(system), HumanMessage("Generate the set of analysts.")]
    )
    assert isinstance(plan, Perspectives) and len(plan.analysts) == n_analysts
    sections: list[str] = []
    for analyst in plan.analysts:
        messages: list[BaseMessage] = [HumanMessage(f"So you said you were writing an article on {topic}?")]
        context: list[str] = []
        for _ in range(2):  # max_num_turns as in the Academy graph
            question = model.invoke(
                [SystemMessage(worker_prompts.question_instructions.format(goals=analyst.persona)), *messages]
            )
            messages.append(question)
            query = model.with_structured_output(SearchQuery).invoke(
                [SystemMessage(worker_prompts.search_instructions), *messages]
            )
            assert isinstance(query, SearchQuery) and query.search_query
            context.append(search_wikipedia_style(query.search_query))
            answer = model.invoke(
                [SystemMessage(ANSWER_PROMPT.format(goals=analyst.persona, context=context)), *messages]
            )
            answer.name = "expert"
            messages.append(answer)
            if "Thank you so much for your help" in str(question.content):
                break
        section = model.invoke(
            [
                SystemMessage(worker_prompts.section_writer_instructions.format(focus=analyst.description)),
                HumanMessage(f"Use this source to write your section: {context}"),
            ]
        )
        sections.append(str(section.content))
    joined = "\n\n".join(sections)
    report = str(
        model.invoke(
            [
                SystemMessage(worker_prompts.report_writer_instructions.format(topic=topic, context=joined)),
                HumanMessage("Write a report based upon these memos."),
            ]
        ).content
    )
    instructions = worker_prompts.intro_conclusion_instructions.format(topic=topic, formatted_str_sections=joined)
    intro = str(model.invoke([instructions, HumanMessage("Write the report introduction")]).content)
    conclusion = str(model.invoke([instructions, HumanMessage("Write the report conclusion")]).content)
    # finalize_report, as the Academy graph does it
    content = report.removeprefix("## Insights")
    content, _, sources = content.partition("\n## Sources\n")
    return f"{intro}\n\n---\n\n{content}\n\n---\n\n{conclusion}" + (f"\n\n## Sources\n{sources}" if sources else "")


def prose(markdown: str) -> list[str]:
    lines = [ln for ln in markdown.splitlines() if ln.strip() and not ln.startswith(("#", "---", "["))]
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(lines)) if len(s.split()) >= 4]


@pytest.mark.parametrize("corpus", sorted(p.name for p in CORPORA.iterdir() if (p / "topic.txt").is_file()))
def test_langchain_academy_prompts_give_a_full_report(
    model: ChatOpenAI, modelserver: ModelServerProcess, corpus: str
) -> None:
    topic = (CORPORA / corpus / "topic.txt").read_text().strip()
    modelserver.reset()
    md = academy_report(model, topic, CORPORA / corpus / "docs")
    kinds = modelserver.stats()["by_kind"]
    assert kinds["intro"] == 1 and kinds["conclusion"] == 1 and kinds["report"] == 1 and kinds["section"] == 3
    assert md.startswith("# ") and len(md.splitlines()[0].split()) >= 3, "a title"
    intro = md.split("## Introduction", 1)[1].split("---", 1)[0]
    body = md.split("---", 2)[1]
    conclusion = md.split("## Conclusion", 1)[1].split("## Sources", 1)[0]
    sources = md.split("\n## Sources\n", 1)[1]
    for name, text in (("introduction", intro), ("body", body), ("conclusion", conclusion)):
        said = prose(text)
        assert len(said) >= 2, f"the {name} says almost nothing: {text!r}"
        assert not any(s.startswith("The provided context does not contain") for s in said), (name, text)
    listed = re.findall(r"^\[(\d+)\] (\S.*?)\s*$", sources, re.M)
    docs = {p.name for p in (CORPORA / corpus / "docs").iterdir()}
    assert listed and all(src in docs for _, src in listed), sources
    assert {int(n) for n in re.findall(r"\[(\d+)\]", body)} <= {int(n) for n, _ in listed}


def test_search_query_keeps_the_topic_and_skips_the_thank_you(model: ChatOpenAI) -> None:
    opening = HumanMessage("So you said you were writing an article on how honeybee colonies reproduce by swarming?")
    asked = AIMessage("Hello, I'm Ada. Where is the field heading in the future?")
    answer = AIMessage("Scouts dance [1].\n\nSources:\n[1] scouts.md", name="expert")
    for messages in ([opening, asked], [opening, asked, answer, AIMessage("Thank you so much for your help!")]):
        q = model.with_structured_output(SearchQuery).invoke([SystemMessage(SEARCH_PROMPT), *messages])
        assert isinstance(q, SearchQuery) and q.search_query
        words = set(q.search_query.split())
        assert {"honeybee", "colonies", "swarming", "future"} <= words and "help" not in words, q.search_query


SECTIONS_MD = """## Queen Rearing

### Summary
Before a swarm can leave, the workers must rear replacement queens [1]. A queen develops faster than any other
member of the colony [1]. Swarm cells hang vertically from the bottom edges of the comb [1].

### Sources
[1] rearing-new-queens.md

## Scout Bees

### Summary
While the swarm hangs in its cluster, a few hundred of the oldest foragers act as scouts [2]. A scout that has
found a promising site returns to the cluster and performs a waggle dance [2]. The swarm does not wait for every
bee to agree [2].

### Sources
[2] scout-bees.md
"""


@pytest.mark.parametrize("shape", ["system-is-generic", "one-user-message"])
def test_instructions_in_a_user_message_are_recognised(
    model: ChatOpenAI, modelserver: ModelServerProcess, shape: str
) -> None:
    instructions = worker_prompts.intro_conclusion_instructions.format(
        topic="How honeybee colonies reproduce by swarming", formatted_str_sections=SECTIONS_MD
    )
    modelserver.reset()
    if shape == "system-is-generic":
        messages: list[BaseMessage] = [
            SystemMessage("You are a helpful assistant."),
            HumanMessage(instructions),
            HumanMessage("Write the report conclusion"),
        ]
    else:
        messages = [HumanMessage(f"{instructions}\n\nWrite the report conclusion")]
    text = str(model.invoke(messages).content)
    assert modelserver.stats()["by_kind"]["conclusion"] == 1
    assert text.startswith("## Conclusion\n") and "does not contain information" not in text
    assert "Queen Rearing" in text and "Scout Bees" in text
