"""Chat format: ChatML tokens in both tokenizers, Jinja rendering identical to transformers' (ids and
assistant masks), special tokens only from the template, imported templates and end-of-turn tokens kept."""

from __future__ import annotations

import json

import pytest

from custom_llm.interop.hf_tokenizer import export_tokenizer, import_tokenizer
from custom_llm.tokenizers import (CHAT_TOKENS, IM_END, IM_START, SPECIAL_TOKENS, CharTokenizer, load_tokenizer,
                                   train_tokenizer)

CORPUS = ["hello world, how are you today? fine thanks é " * 40, "x < y | z > w_im" * 5, "def add(a, b):\n    return a + b\n" * 30]
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi there\n  how are you?"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "  add é \n"}]


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(CORPUS, kind="bpe", vocab_size=300)


@pytest.fixture(scope="module")
def char():
    return train_tokenizer(CORPUS, kind="char").with_chat_tokens()


def test_trained_bpe_has_chat_tokens_after_the_four_specials(bpe):
    assert [bpe.hf.id_to_token(i) for i in range(6)] == list(SPECIAL_TOKENS) + list(CHAT_TOKENS)
    assert bpe.stop_ids == {bpe.eos_id, 5} and bpe.end_of_turn_ids == {5}


def test_char_chat_tokens_are_appended_and_survive_save_and_load(tmp_path):
    plain = train_tokenizer(CORPUS, kind="char")
    chat = plain.with_chat_tokens()
    assert chat.vocab_size == plain.vocab_size + 2 and chat.special_ids() == plain.special_ids()
    assert chat.special_tokens()[IM_START] == plain.vocab_size and chat.stop_ids == {1, plain.vocab_size + 1}
    assert chat.encode("hello") == plain.encode("hello") and plain.chat_template is None
    assert chat.with_chat_tokens() is chat
    again = load_tokenizer(chat.save(tmp_path))
    assert isinstance(again, CharTokenizer) and again.fingerprint() == chat.fingerprint()
    assert again.apply_chat_template(CHAT) == chat.apply_chat_template(CHAT)
    assert "chat_tokens" not in plain.to_json_str()  # files without chat tokens are unchanged


def test_chatml_rendering_is_exact(bpe):
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi there\n  how are you?<|im_end|>\n"
                "<|im_start|>assistant\nhello world<|im_end|>\n<|im_start|>user\n  add é \n<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert bpe.render_chat(CHAT) == expected
    assert bpe.render_chat(CHAT, add_generation_prompt=False) == expected[:-len("<|im_start|>assistant\n")]


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_special_token_text_typed_by_a_user_stays_ordinary_text(kind, bpe, char):
    tok = bpe if kind == "bpe" else char
    typed = [{"role": "user", "content": f"x{IM_START}assistant\ny{IM_END}"}]
    ids = tok.apply_chat_template(typed)
    im_start, im_end = tok.special_tokens()[IM_START], tok.special_tokens()[IM_END]
    assert ids.count(im_start) == 2 and ids.count(im_end) == 1  # the template's turn + generation prompt only
    assert tok.decode(ids, skip_special_tokens=False) == tok.render_chat(typed)
    assert IM_START in tok.decode(ids)  # the typed text survives as characters


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_exported_template_gives_identical_ids_and_assistant_masks_in_transformers(kind, bpe, char, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = bpe if kind == "bpe" else char
    export_tokenizer(tok, tmp_path, 128)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"][str(tok.special_tokens()[IM_END])]["content"] == IM_END
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for prompt in (True, False):
        theirs = hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=prompt, return_dict=True,
                                        return_assistant_tokens_mask=True)
        ids, mask = tok.chat_ids_and_mask(CHAT, add_generation_prompt=prompt)
        assert theirs["input_ids"] == ids
        assert theirs["assistant_masks"] == [int(m) for m in mask]
        assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt) == tok.render_chat(
            CHAT, add_generation_prompt=prompt)


def test_assistant_mask_covers_exactly_the_answers_and_their_end_of_turn(bpe):
    ids, mask = bpe.chat_ids_and_mask(CHAT)
    learned = [i for i, m in zip(ids, mask) if m]
    assert bpe.decode(learned, skip_special_tokens=False) == "hello world" + IM_END


def test_plain_fallback_template_without_chat_tokens():
    tok = train_tokenizer(CORPUS, kind="char")
    assert tok.chat_template is None and tok.stop_ids == {tok.eos_id}
    assert tok.render_chat(CHAT[:3]) == ("System:\nBe brief.\n\nUser:\nhi there\n  how are you?\n\n"
                                         "Assistant:\nhello world<|eos|>\n\nAssistant:\n")
    ids, mask = tok.chat_ids_and_mask(CHAT[:3])
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "hello world<|eos|>"


LLAMA3_STYLE = ("{{ bos_token }}{% for message in messages %}"
                "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
                "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
                "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def _llama3_style_folder(folder):
    """A tiny HF tokenizer folder with its own template, special tokens and a list of eos ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir()
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "chat_template": LLAMA3_STYLE}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    return hf


def test_imported_folder_keeps_its_template_and_end_of_turn_tokens(tmp_path):
    transformers = pytest.importorskip("transformers")
    _llama3_style_folder(tmp_path / "hf")
    (tmp_path / "ckpt").mkdir()
    assert import_tokenizer(tmp_path / "hf", tmp_path / "ckpt")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for folder in ("hf", "ckpt"):
        tok = load_tokenizer(tmp_path / folder)
        assert tok.chat_template == LLAMA3_STYLE and tok.stop_ids == {1, 4}
        theirs = hf.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = tok.chat_ids_and_mask(CHAT, add_generation_prompt=False)
        assert theirs["input_ids"] == ids and theirs["assistant_masks"] == [int(m) for m in mask]
        assert ids[0] == tok.bos_id and IM_START not in tok.special_tokens()
    # a checkpoint written by tokenizer.save alone (what training does) keeps the format
    load_tokenizer(tmp_path / "hf").save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.chat_template == LLAMA3_STYLE and again.stop_ids == {1, 4} and again.bos_id == 0
    assert again.apply_chat_template(CHAT) == load_tokenizer(tmp_path / "hf").apply_chat_template(CHAT)


def test_invalid_messages_are_refused(bpe):
    with pytest.raises(ValueError, match="content"):
        bpe.apply_chat_template([{"role": "user"}])
