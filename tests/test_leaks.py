"""Leak checks catch every planted leak kind, and a clean control set of the same size raises none."""

from __future__ import annotations

import random

import pytest
from conftest import write_jsonl

from ftpipe.cleaning import NearDuplicates
from ftpipe.errors import PipelineError
from ftpipe.leaks import find_leaks
from ftpipe.params import PrepareDataParams
from stages.prepare_data import run

SYLLABLES = "ka lo mi ne ru sa te vo zi pa do fe gu hi ja".split()
VOCAB = [a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES[:5]]  # 1,125 words


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def row(rid: str, prompt: str, response: str) -> dict:
    return {"id": rid, "origin": rid, "messages": [{"role": "user", "content": prompt},
                                                    {"role": "assistant", "content": response}]}


def text(record: dict) -> str:
    return "\n".join(m["content"] for m in record["messages"])


def make_train(n: int = 200) -> list[dict]:
    rng = random.Random(1)
    return [row(f"t{i}", sentence(rng, rng.randint(8, 16)), sentence(rng, rng.randint(14, 30))) for i in range(n)]


def planted(train: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """Eval rows that each leak one train row in a known way, plus clean filler: (rows, id -> kind)."""
    rng = random.Random(2)
    p = lambda r: r["messages"][0]["content"]  # noqa: E731
    a = lambda r: r["messages"][1]["content"]  # noqa: E731
    words = p(train[3]).split()
    words[len(words) // 2] = "zzedited"
    shared = a(train[5]).split()[:13]
    leaks = [
        row("exact", p(train[0]), a(train[0])),
        row("exact_prompt", p(train[1]), "a different answer entirely"),
        row("case", p(train[2]).upper() + " ?!", "  " + a(train[2]).title() + "."),
        row("one_word", " ".join(words), a(train[3])),
        row("ngram", sentence(rng, 10), sentence(rng, 6) + " " + " ".join(shared) + " " + sentence(rng, 6)),
    ]
    expected = {"exact": "exact_pair", "exact_prompt": "exact_prompt", "case": "normalized_pair",
                "one_word": "near_pair", "ngram": "ngram"}
    filler = [row(f"e{i}", sentence(rng, 12), sentence(rng, 20)) for i in range(45)]
    return leaks + filler, expected


def test_every_planted_leak_is_caught_with_its_kind():
    train = make_train()
    evals, expected = planted(train)
    leaks = find_leaks(train, {"test": evals}, threshold=0.8, ngram=13)
    assert {leak.eval_id: leak.kind for leak in leaks} == expected


def test_clean_control_set_of_the_same_size_raises_none():
    train = make_train()
    rng = random.Random(3)
    control = [row(f"c{i}", sentence(rng, 12), sentence(rng, 20)) for i in range(50)]
    assert find_leaks(train, {"test": control}, threshold=0.8, ngram=13) == []


def test_identical_long_answers_leak_whatever_the_prompt_but_common_short_ones_do_not():
    from ftpipe.cleaning import jaccard, shingles, words

    rng = random.Random(4)
    train = make_train()
    # Short prompts with answers of 8-10 words: too short for a 13-gram, and one edited prompt word
    # keeps the pair's Jaccard under 0.8.
    train += [row(f"a{i}", sentence(rng, 3), sentence(rng, rng.randint(8, 10))) for i in range(10)]
    common = ["Yes.", "I don't know.", "No.", "Thank you very much."]
    train += [row(f"s{i}", sentence(rng, 6), common[i % 4]) for i in range(40)]
    planted = []
    for i, r in enumerate(train[200:210]):
        prompt, answer = (m["content"] for m in r["messages"])
        edited = prompt.split()
        edited[1] = "zzedited"
        answer = answer if i % 2 else answer.upper() + "!"  # identical once normalized
        planted.append(row(f"p{i}", " ".join(edited), answer))
        assert jaccard(shingles(words(r["messages"][0]["content"] + "\n" + r["messages"][1]["content"])),
                       shingles(words(" ".join(edited) + "\n" + answer))) < 0.8
    shorts = [row(f"q{i}", sentence(rng, 6), common[i % 4]) for i in range(40)]
    evals = {"test": planted + shorts}
    leaks = find_leaks(train, evals, threshold=0.8, ngram=13)
    assert {x.eval_id: (x.kind, x.train_id) for x in leaks} == {f"p{i}": ("same_response", f"a{i}") for i in range(10)}
    assert find_leaks(train, evals, threshold=0.8, ngram=13, min_response_words=13) == []


@pytest.fixture
def data_with_external(tmp_path):
    train = make_train(120)
    raw = [{"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]} for r in train]
    data = write_jsonl(tmp_path / "raw.jsonl", raw)
    external = write_jsonl(tmp_path / "benchmark.jsonl", [raw[7], {"prompt": "fresh question", "response": "fresh"}])
    return data, external


def test_external_eval_file_overlapping_train_fails_the_stage(tmp_path, data_with_external):
    data, external = data_with_external
    params = PrepareDataParams(source="file", path=str(data), external_eval=[str(external)])
    with pytest.raises(PipelineError, match=r"1 evaluation row\(s\) leak from train, e.g. exact_pair: external:benchmark"):
        run(params=params, out_dir=tmp_path / "prepared", reports_dir=tmp_path / "reports")
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "reports").exists()


def test_warn_keeps_and_drop_removes_the_leaking_training_rows(tmp_path, data_with_external):
    data, external = data_with_external
    reports = {}
    for action in ("warn", "drop"):
        params = PrepareDataParams(source="file", path=str(data), external_eval=[str(external)], leak_action=action)
        reports[action] = run(params=params, out_dir=tmp_path / action, reports_dir=tmp_path / f"r-{action}")
    assert reports["warn"].leaks.exact_pair == 1 and reports["warn"].train_rows_dropped_for_leaks == 0
    assert reports["drop"].train_rows_dropped_for_leaks == 1
    assert reports["drop"].splits["train"] == reports["warn"].splits["train"] - 1
    text = (tmp_path / "r-drop" / "data_report.md").read_text()
    assert "| exact_pair | external:benchmark.jsonl/000000" in text


def test_drop_that_empties_train_fails_cleanly(tmp_path, data_with_external):
    data, _ = data_with_external
    params = PrepareDataParams(source="file", path=str(data), external_eval=[str(data)], leak_action="drop")
    with pytest.raises(PipelineError, match=r"dropping leaking rows left no training rows"):
        run(params=params, out_dir=tmp_path / "prepared", reports_dir=tmp_path / "reports")
    assert not (tmp_path / "prepared").exists()


def test_every_leak_goes_to_leaks_jsonl_and_fail_says_how_many_and_where(tmp_path):
    import json

    train = make_train(120)
    raw = [{"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]} for r in train]
    data = write_jsonl(tmp_path / "raw.jsonl", raw)
    external = write_jsonl(tmp_path / "benchmark.jsonl", raw[:40])  # those that land in train leak
    params = PrepareDataParams(source="file", path=str(data), external_eval=[str(external)], leak_action="warn")
    reports = tmp_path / "reports"
    n = run(params=params, out_dir=tmp_path / "prepared", reports_dir=reports).leaks.total
    assert n > 20
    rows = [json.loads(line) for line in (reports / "leaks.jsonl").read_text().splitlines()]
    assert len(rows) == n and len({r["eval_id"] for r in rows}) == n
    assert set(rows[0]) == {"kind", "eval_set", "eval_id", "train_id", "eval_text", "train_text"}
    assert rows[0]["kind"] == "exact_pair" and rows[0]["eval_set"] == "external:benchmark.jsonl"
    text = (reports / "data_report.md").read_text()
    assert text.count("| exact_pair | external:benchmark.jsonl/") == 20
    assert f"{n - 20} more leak(s) not shown: all {n} are in {reports}/leaks.jsonl." in text

    failing = tmp_path / "failing"
    with pytest.raises(PipelineError, match=rf"^prepare_data: {n} evaluation row\(s\) leak .*set it to warn to "
                                            rf"list all {n} in {failing}/leaks.jsonl") as err:
        run(params=params.model_copy(update={"leak_action": "fail"}), out_dir=tmp_path / "p2", reports_dir=failing)
    assert "\n" not in str(err.value) and not failing.exists() and not (tmp_path / "p2").exists()


# Short English rows with short answers, as in chatterbot-corpus: under `min_leak_response_words`,
# too short for a 13-gram, and a one-character edit of the prompt drops the pair's Jaccard under 0.8.
SHORT = [
    ("What does the noun 'cat' mean?", "A small animal that purrs."),
    ("What does the word adjective mean?", "A word that describes a noun."),
    ("How many legs does a spider have?", "Eight."),
    ("What is your favourite colour?", "Blue."),
    ("Are you a robot?", "Yes."),
    ("Do you know what time it is?", "I don't know."),
    ("Where did you learn to speak English?", "From my training data."),
    ("Can you recommend a good book?", "Try Dune."),
    ("Which planet is closest to the sun?", "Mercury."),
    ("I don't like rainy days.", "Neither do I."),
    ("What do you think about artificial intelligence?", "It is fascinating."),
    ("Tell me about the weather today.", "It is sunny."),
    ("Where can I get a good café au lait?", "Try the corner shop."),
]
# (eval id, train row edited, prompt after a one-character or one-inflection edit)
TYPOS = [
    ("doubled", 2, "How many legs doess a spider have?"),
    ("plural", 0, "What does the nouns 'cat' mean?"),
    ("plural_long", 1, "What does the word adjectives mean?"),
    ("dropped", 6, "Where did you learn to speak Englsh?"),
    ("swapped", 3, "Waht is your favourite colour?"),
    ("neighbour_key", 4, "Are you a ronot?"),
    ("replaced_long", 8, "Which plenet is closest to the sun?"),
    ("replaced_any", 10, "What do you think about artificial intelligance?"),
    ("apostrophe", 9, "I dont like rainy days."),
    ("dropped_a", 7, "Can you recommend good book?"),
    ("added_long", 11, "Tell me about the weather todays."),
    ("neighbour_short", 5, "Do you know what tine it is?"),
    ("accent", 12, "Where can I get a good cafe au lait?"),
]
# Rows that share a template and a short answer but differ in the slot word: not leaks of one another.
ANIMALS = "cat dog bat rat cow owl pig hen mole mule vole hare mare bear deer wolf lion goat seal duck".split()
TEMPLATES = ([(f"What does the noun '{x}' mean?", "An animal.") for x in ANIMALS]
             + [(f"Is {x} a happy name for a pet?", "Yes.") for x in ("he", "she", "Tom", "Tim", "Max", "Mia")]
             + [(f"What is {a} plus {b}?", "I don't know.") for a in (12, 13, 17) for b in (3, 5)]
             + [(f"Do you like {x}?", "Yes.") for x in ("cake", "cats", "tea", "the sea", "jazz", "chess", "rain",
                                                        "music", "movies", "books", "dogs", "snow")]
             + [(f"Is it {x} today?", "No.") for x in ("cold", "warm", "hot", "sunny", "windy", "rainy")])


def test_one_character_and_inflection_edits_of_short_pairs_are_typo_pairs_and_templates_are_not():
    from ftpipe.cleaning import jaccard, shingles, words

    rng = random.Random(5)
    train = make_train() + [row(f"s{i}", p, a) for i, (p, a) in enumerate(SHORT)]
    train += [row(f"tpl{i}", p, a) for i, (p, a) in enumerate(TEMPLATES) if i % 2 == 0]
    planted = []
    for rid, k, prompt in TYPOS:
        answer = SHORT[k][1] if rng.random() < 0.5 else SHORT[k][1].upper() + " "  # identical once normalized
        planted.append(row(rid, prompt, answer))
        assert jaccard(shingles(words(prompt + "\n" + answer)), shingles(words(text(train[200 + k])))) < 0.8
    clean = [row(f"tpl{i}", p, a) for i, (p, a) in enumerate(TEMPLATES) if i % 2 == 1]
    leaks = find_leaks(train, {"test": planted + clean}, threshold=0.8, ngram=13)
    found = {x.eval_id: (x.kind, x.train_id) for x in leaks}
    assert found == {rid: ("typo_pair", f"s{k}") for rid, k, _ in TYPOS}  # every planted row, nothing else
    false_alarms = [x.short() for x in leaks if x.eval_id.startswith("tpl")]
    assert len(false_alarms) == 0, false_alarms


def test_template_rows_that_differ_in_the_slot_word_raise_no_leak_whichever_half_trains():
    rows = [row(f"tpl{i}", p, a) for i, (p, a) in enumerate(TEMPLATES)]
    # A positive control: a one-letter slip of a template row outside its slot is still a leak.
    control = row("control", "What does the noun 'mole' meann?", "An animal.")
    false_alarms, caught = [], []
    for train_half in (0, 1):
        train = [r for i, r in enumerate(rows) if i % 2 == train_half]
        evals = [r for i, r in enumerate(rows) if i % 2 != train_half]
        found = find_leaks(train, {"test": evals + [control]}, threshold=0.8, ngram=13)
        caught += [(x.kind, x.train_id) for x in found if x.eval_id == "control"]
        false_alarms += [x for x in found if x.eval_id != "control"]
    near = NearDuplicates(0.8)  # one index for all the calls below, as prepare_data shares one
    for i, r in enumerate(rows):  # and each row against all the others: every pair of the set is compared
        false_alarms += find_leaks(rows[:i] + rows[i + 1:], {"test": [r]}, threshold=0.8, ngram=13, near=near)
    mole = f"tpl{ANIMALS.index('mole')}"
    assert caught == [("typo_pair", mole)]  # mole trains in one half only
    assert len(false_alarms) == 0, [x.short() for x in false_alarms]


def test_typo_pairs_need_the_same_answer_and_short_common_answers_need_a_slip():
    train = [row("t0", "What does the noun 'cat' mean?", "An animal."), row("t1", "Are you a robot?", "Yes."),
             row("t2", "Do you like your work?", "Yes."), row("t3", "Is he happy?", "Yes.")]
    evals = [row("other_answer", "What does the nouns 'cat' mean?", "A pet."),  # answers differ: not a typo_pair
             row("bat", "What does the noun 'bat' mean?", "An animal."),  # another word: first letter changed
             row("worm", "Do you like your worm?", "Yes."),  # k/m are keys apart, but worm is a word: accepted
             row("she", "Is she happy?", "Yes."),  # he/she: a slot, not a slip
             row("robots", "Are you a robots?", "Yes.")]
    found = {x.eval_id: x.kind for x in find_leaks(train, {"test": evals}, threshold=0.8, ngram=13)}
    assert found == {"worm": "typo_pair", "robots": "typo_pair"}


@pytest.mark.parametrize(("a", "b", "close"), [
    ("does", "doess", True), ("noun", "nouns", True), ("adjective", "adjectives", True), ("city", "cities", True),
    ("box", "boxes", True), ("what", "waht", True), ("what", "whst", True), ("hello", "helo", True),
    ("english", "englsh", True), ("because", "becuse", True), ("animals", "animsls", True), ("café", "cafe", True),
    ("cat", "bat", False), ("he", "she", False), ("mole", "mule", False), ("were", "where", False),
    ("the", "then", False), ("cat", "dog", False), ("1997", "1999", False), ("walk", "walked", False),
    ("plan", "plane", False), ("hose", "horse", False), ("bear", "beer", False), ("cake", "care", False),
])
def test_word_slip(a, b, close):
    from ftpipe.typos import word_slip

    assert word_slip(a, b) is close and word_slip(b, a) is close


def test_typo_links_join_exactly_the_pairs_typo_pair_would_flag():
    from ftpipe.typos import typo_links

    rows = ([row(f"s{i}", p, a) for i, (p, a) in enumerate(SHORT)]
            + [row(rid, prompt, SHORT[k][1]) for rid, k, prompt in TYPOS]
            + [row(f"tpl{i}", p, a) for i, (p, a) in enumerate(TEMPLATES)])
    links = {frozenset((rows[i]["id"], rows[j]["id"])) for i, j in typo_links(rows)}
    flagged, near = set(), NearDuplicates(0.8)
    for i, r in enumerate(rows):
        for leak in find_leaks(rows[:i] + rows[i + 1:], {"test": [r]}, threshold=0.8, ngram=13, near=near):
            if leak.kind == "typo_pair":
                flagged.add(frozenset((leak.eval_id, leak.train_id)))
    assert links == flagged == {frozenset((rid, f"s{k}")) for rid, k, _ in TYPOS}


def test_a_template_slot_with_thousands_of_fills_finds_its_one_typo():
    from ftpipe.typos import typo_links

    fills = [a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES]  # 3,375 distinct slot words
    rows = [row(f"r{i}", f"What does the noun '{w}' mean?", "An animal.") for i, w in enumerate(fills)]
    rows.append(row("typo", f"What does the noun '{fills[7]}' meann?", "An animal."))
    links = typo_links(rows)
    assert (len(rows) - 1, 7) in {(max(p), min(p)) for p in links}
