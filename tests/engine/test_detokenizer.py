"""The engine's detokenization: the same text as ``tokenizer.decode`` on every built-in tokenizer, whole
(``fast_decode``) and incremental (``Detokenizer``, tokenizers' ``DecodeStream``)."""

from __future__ import annotations

import random

import pytest

from zipvl_ray.config import ZipVLConfig
from zipvl_ray.engine import LLMEngine, SamplingParams
from zipvl_ray.engine.detokenizer import Detokenizer, fast_decode, first_stop
from zipvl_ray.engine.sequence import Sequence, SequenceStatus
from zipvl_ray.models import load_processor

from ..conftest import TINY_ARCHS
from .conftest import mixed_prompts


@pytest.mark.parametrize("model", [*TINY_ARCHS, "zipvl-tiny"])
def test_fast_decode_equals_decode(model):
    tokenizer = load_processor(model).tokenizer
    decode = fast_decode(tokenizer)
    assert decode != tokenizer.decode  # the shortcut is taken for these tokenizers
    rng = random.Random(0)
    vocab = len(tokenizer)
    cases = [[], [0], list(range(min(vocab, 300)))]
    cases += [[rng.randrange(vocab) for _ in range(rng.randrange(1, 40))] for _ in range(50)]
    cases += [tokenizer.encode("Hello, world! A red square at (3, 4).", add_special_tokens=False)]
    for ids in cases:
        for skip in (True, False):
            assert decode(ids, skip_special_tokens=skip) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_a_tokenizer_with_its_own_decode_keeps_it():
    tokenizer = load_processor("tiny-llava").tokenizer

    class Custom(type(tokenizer)):
        def decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return "custom"

    tokenizer.__class__ = Custom
    assert fast_decode(tokenizer)([1, 2], skip_special_tokens=True) == "custom"


def test_a_decode_replaced_on_the_instance_is_kept():
    tokenizer = load_processor("tiny-llava").tokenizer
    tokenizer.decode = lambda ids, **kwargs: "patched"
    assert fast_decode(tokenizer)([1, 2], skip_special_tokens=True) == "patched"


def test_anything_else_uses_its_decode():
    class Plain:
        def decode(self, ids, skip_special_tokens=False):
            return ",".join(map(str, ids))

    assert fast_decode(Plain())([1, 2], skip_special_tokens=True) == "1,2"


# -- incremental detokenization --------------------------------------------------------------------------

TEXT = "Hello, world! A red square at (3, 4), ü and 日本語 — left of the circle.\n"


def llama_like_tokenizer():
    """A SentencePiece-style tokenizer (Llama's decoder: metaspace, byte fallback, strip one leading space),
    built from scratch, so the stream is checked on the other common family of decoders."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "▁the", "▁red", "▁square", "▁left", "▁of", "▁a", "H", "ello", "▁world", ",", "."]:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )


def tokenizers_under_test():
    return {name: load_processor(name).tokenizer for name in [*TINY_ARCHS, "zipvl-tiny"]} | {
        "llama-like": llama_like_tokenizer()
    }


def fake_sequence(stop=None):

    return Sequence(
        request_id="r",
        prompt_token_ids=[1],
        image_features=[],
        positions=None,
        next_position=1,
        sampling=SamplingParams(stop=stop or []),
        zipvl=ZipVLConfig(),
    )


def stream_texts(detokenizer, ids):
    """The text after each token, then the text once finished."""

    seq, texts = fake_sequence(), []
    for token in ids:
        seq.output_token_ids.append(token)
        texts.append(detokenizer.text(seq))
    seq.status = SequenceStatus.FINISHED
    return texts, detokenizer.text(seq)


@pytest.fixture(scope="module")
def tokenizers():
    return tokenizers_under_test()


@pytest.mark.parametrize("name", [*TINY_ARCHS, "zipvl-tiny", "llama-like"])
def test_every_built_in_tokenizer_streams(tokenizers, name):

    assert Detokenizer(tokenizers[name]).incremental


@pytest.mark.parametrize("name", [*TINY_ARCHS, "zipvl-tiny", "llama-like"])
def test_streamed_text_is_decode_of_each_prefix_without_a_partial_character(tokenizers, name):
    """On text (multi-byte characters split across tokens included), the text after every token is what
    decoding that prefix gives, held back before a trailing partial character; the finished text is
    ``decode`` exactly."""

    tokenizer = tokenizers[name]
    ids = tokenizer.encode(TEXT * 2, add_special_tokens=False)
    texts, final = stream_texts(Detokenizer(tokenizer), ids)
    for k, text in enumerate(texts, 1):
        assert k == 1 or text.startswith(texts[k - 2])  # the text only grows
        assert final.startswith(text)
        if name != "llama-like":
            assert text == tokenizer.decode(ids[:k], skip_special_tokens=True).rstrip("\ufffd")
        # (byte fallback decodes a prefix that ends inside a character as one replacement character per
        # byte of the whole byte run, so the stream shows a completed character before such a prefix does)
    assert final == tokenizer.decode(ids, skip_special_tokens=True) == TEXT * 2


@pytest.mark.parametrize("name", [*TINY_ARCHS, "zipvl-tiny", "llama-like"])
def test_finished_text_is_decode_exactly_for_any_tokens(tokenizers, name):
    """Random ids (special tokens, invalid byte runs) included: a finished sequence's text is ``decode``."""

    tokenizer = tokenizers[name]
    detokenizer, reference = Detokenizer(tokenizer), Detokenizer(tokenizer, incremental=False)
    assert not reference.incremental
    rng = random.Random(1)
    for _ in range(60):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 50))]
        texts, final = stream_texts(detokenizer, ids)
        ref_texts, ref_final = stream_texts(reference, ids)
        assert final == ref_final == tokenizer.decode(ids, skip_special_tokens=True)
        assert ref_texts == [
            tokenizer.decode(ids[:k], skip_special_tokens=True) for k in range(1, len(ids) + 1)
        ]
        if name != "llama-like":  # byte-level BPE decodes prefix by prefix: the stream follows it exactly
            assert texts == [t.rstrip("\ufffd") for t in ref_texts]


def test_the_stream_gives_up_where_byte_fallback_rewrites_text():
    """Byte fallback decodes a run of byte tokens that holds an invalid byte as one replacement character
    per byte, rewriting text the stream already returned ("A" here); tokenizers' stream then raises, and
    the sequence is decoded whole from that token on. A stop string cuts the exact text."""
    tokenizer = llama_like_tokenizer()
    byte = tokenizer.convert_tokens_to_ids
    ids = [byte("<0x41>"), byte("<0xC3>"), *tokenizer.encode(" the red", add_special_tokens=False)]
    seq, detokenizer = fake_sequence(stop=["red"]), Detokenizer(tokenizer)
    texts = []
    for token in ids:
        seq.output_token_ids.append(token)
        texts.append(detokenizer.text(seq))
    # "A", then "A" with the incomplete byte held back; the next token shows the byte invalid
    assert texts[:2] == ["A", "A"] and seq.text_stream is False
    assert texts[2:] == [tokenizer.decode(ids[:k], skip_special_tokens=True) for k in range(3, len(ids) + 1)]
    cut = first_stop(texts[-1], ["red"])
    # as the engine does when a stop string ends a sequence
    seq.text_limit, seq.text, seq.status = cut, texts[-1][:cut], SequenceStatus.FINISHED
    exact = tokenizer.decode(ids, skip_special_tokens=True)
    assert detokenizer.text(seq) == exact[: exact.find("red")] == "\ufffd\ufffd  the "


def test_a_tokenizer_that_cleans_up_spaces_decodes_whole_outputs():

    tokenizer = llama_like_tokenizer()
    tokenizer.clean_up_tokenization_spaces = True
    assert not Detokenizer(tokenizer).incremental
    assert not Detokenizer(load_processor("tiny-llava").tokenizer, incremental=False).incremental


def test_engine_outputs_are_the_same_with_and_without_the_stream(tiny_llava):
    """The engine's outputs (text, streamed deltas, stop strings) do not change with incremental
    detokenization; only the work per token does."""

    model, processor = tiny_llava

    def run(incremental, sampling):
        eng = LLMEngine(model, processor)
        assert eng.detokenizer.incremental
        eng.detokenizer = Detokenizer(processor.tokenizer, incremental=incremental)
        for i, prompt in enumerate(mixed_prompts()):
            eng.add_request(f"r{i}", prompt, sampling)
        outs = []
        while eng.has_unfinished():
            outs.extend((o.request_id, o.text, o.delta_text, o.finished, o.finish_reason) for o in eng.step())
        return outs

    plain = SamplingParams(max_tokens=24, ignore_eos=True)
    reference = run(False, plain)
    assert run(True, plain) == reference
    finals = [text for _, text, _, finished, _ in reference if finished]
    # A stop string of whole characters (random weights write many partial ones: a stop string with a
    # replacement character would match the whole decode's placeholder for a character still incomplete)
    pairs = (t[i : i + 2] for t in finals for i in range(2, len(t) - 2))
    stop = next((p for p in pairs if p.strip() and "\ufffd" not in p), None)
    if stop is not None:  # a stop string that ends at least one of the requests
        # The same final outputs, and the deltas add up to them. (The deltas may be split differently:
        # the whole decode ends in a replacement character while a character is incomplete, which hid
        # the start of a possible stop string before it; the stream holds that start back.)
        stopped = SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop])
        for outs in (run(True, stopped), run(False, stopped)):
            for request_id, text, _, finished, _ in outs:
                if finished:
                    deltas = "".join(d for r, _, d, _, _ in outs if r == request_id)
                    assert deltas == text
        finals = [[o for o in outs if o[3]] for outs in (run(True, stopped), run(False, stopped))]
        assert finals[0] == finals[1] and any(reason == "stop" for *_, reason in finals[0])


# -- the engine with scripted tokens ---------------------------------------------------------------------

PIECES = ["a", "b", " ", "ab", "é", "日本", "ü", "x", "\n", "ba", " a"]
STOPS = ["é", "ab", "日本", "a é", " b", "ba", "ü", "x\n", "\ufffd", "b\ufffd"]


def scripted_engine(tiny_llava, monkeypatch, incremental: bool):
    """An engine whose sampled tokens are replaced by each request's script (the model still runs), with a
    small pool (preemption and replay) and aggressive ZipVL."""
    import zipvl_ray.engine.llm_engine as llm_engine
    from zipvl_ray.config import EngineConfig

    model, processor = tiny_llava
    scripts = {}

    def scripted_sample(logits, params, generators, histories=None):
        return [next(scripts[id(p)]) for p in params], [None] * len(params)

    monkeypatch.setattr(llm_engine, "sample", scripted_sample)
    eng = LLMEngine(
        model,
        processor,
        zipvl=ZipVLConfig(tau=0.9, probe_recent=8, probe_random=8),
        engine=EngineConfig(kv_cache_bytes=100 * 4096, decode_headroom_tokens=0),
    )
    eng.detokenizer = Detokenizer(processor.tokenizer, incremental=incremental)
    return eng, scripts


def run_scripted(tiny_llava, monkeypatch, incremental, rng, seed, script, output_kind="stream"):
    """Six scripted requests (``script(n)``: the tokens of a request of ``n``) with random stop strings,
    stop token ids and aborts, through :func:`scripted_engine`'s small pool. Returns the sampling
    parameters and every output of each request in order, the steps taken, the preemptions and the KV
    bytes (with ZipVL, dense) each request's first output reported when it arrived."""
    tokenizer = tiny_llava[1].tokenizer
    eng, scripts = scripted_engine(tiny_llava, monkeypatch, incremental)
    params, outputs, abort_at, first_kv = {}, {}, {}, {}
    for i, prompt in enumerate(mixed_prompts(n_images=(3, 3, 1, 0, 2, 3), seed=seed)):
        rid, n = f"r{i}", rng.randrange(1, 30)
        sampling = SamplingParams(
            max_tokens=n,
            ignore_eos=True,
            stop=[rng.choice(STOPS) for _ in range(rng.randrange(0, 3))],
            stop_token_ids=[rng.randrange(len(tokenizer))] if rng.random() < 0.2 else [],
            output_kind=output_kind,
        )
        scripts[id(sampling)] = script(n)
        params[rid], outputs[rid] = sampling, []
        eng.add_request(rid, prompt, sampling)
        if rng.random() < 0.3:
            abort_at[rid] = rng.randrange(1, 40)
    steps = 0
    while eng.has_unfinished():
        outs = eng.step()
        steps += 1
        outs += [o for rid, at in abort_at.items() if at == steps and (o := eng.abort_request(rid))]
        for o in outs:
            outputs[o.request_id].append(o)
            # Read now: every output of a request shares its live metrics object.
            first_kv.setdefault(o.request_id, (o.metrics.kv_bytes, o.metrics.kv_bytes_dense))
    return params, outputs, steps, eng.stats().num_preemptions, first_kv


@pytest.mark.parametrize("incremental", [True, False])
def test_scripted_outputs_keep_text_and_deltas_exact(tiny_llava, monkeypatch, incremental):
    """Scripted outputs with multi-byte characters split across tokens, lone invalid bytes, special tokens,
    stop strings (with U+FFFD too), stop token ids, aborts and preemptions: every finished text is
    ``decode`` cut before the first stop string, and the streamed deltas add up to it. (Found by a review:
    a U+FFFD stop string the stream never showed, and a stop prefix sent before a trailing U+FFFD.)"""
    _, processor = tiny_llava
    tokenizer = processor.tokenizer
    rng = random.Random(2)

    def script(n):
        ids = []
        while len(ids) < n:
            if rng.random() < 0.15:
                ids.append(rng.randrange(len(tokenizer)))  # any token: specials, lone bytes
            else:
                ids += tokenizer.encode(rng.choice(PIECES), add_special_tokens=False)
        return iter(ids[:n])

    checked = preempted = 0
    for rnd in range(6):
        params, outputs, _, preemptions, _ = run_scripted(
            tiny_llava, monkeypatch, incremental, rng, rnd, script
        )
        preempted += preemptions
        for rid, outs in outputs.items():
            if not outs or not outs[-1].finished:
                continue
            out = outs[-1]
            text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
            cut = first_stop(text, params[rid].stop)
            assert out.text == (text[:cut] if cut >= 0 else text), (rid, out.token_ids, params[rid].stop)
            deltas = [o.delta_text for o in outs]
            assert "".join(deltas) == out.text, (rid, deltas)
            checked += 1
    assert checked == 36 and preempted > 0


@pytest.mark.parametrize("incremental", [True, False])
def test_a_stop_prefix_before_an_incomplete_character_is_held_back(tiny_llava, monkeypatch, incremental):
    """ "x", "a", then the two bytes of "é" with the stop string "aé": while "é" is incomplete the whole
    decode ends in U+FFFD, and the "a" before it may begin the stop string, so it is not sent."""
    _, processor = tiny_llava
    tokenizer = processor.tokenizer
    eng, scripts = scripted_engine(tiny_llava, monkeypatch, incremental)
    ids = tokenizer.encode("xa", add_special_tokens=False) + tokenizer.convert_tokens_to_ids(["Ã", "©"])
    assert tokenizer.decode(ids) == "xaé"
    sampling = SamplingParams(max_tokens=4, ignore_eos=True, stop=["aé"])
    scripts[id(sampling)] = iter(ids)
    eng.add_request("r", "hello", sampling)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert [o.delta_text for o in outs] == ["x", "", "", ""]
    assert outs[-1].text == "x" and outs[-1].finish_reason == "stop"


@pytest.mark.parametrize("incremental", [True, False])
def test_final_only_outputs_are_the_streamed_finals_and_nothing_before(tiny_llava, monkeypatch, incremental):
    """``output_kind="final_only"`` (non-streamed API requests, ``LLM.generate``): one output per request,
    the finished one, equal to the last output of the same request streamed (tokens, text cut at stop
    strings, finish reason, KV after prefill), through stop token ids, aborts and preemptions."""
    _, processor = tiny_llava
    tokenizer = processor.tokenizer

    def run(kind: str, seed: int) -> tuple[dict, int, int]:
        rng = random.Random(seed)

        def script(n):
            ids = []
            while len(ids) < n:
                ids += tokenizer.encode(rng.choice(PIECES), add_special_tokens=False)
            return iter(ids[:n])

        _, outputs, steps, preemptions, first_kv = run_scripted(
            tiny_llava, monkeypatch, incremental, rng, seed, script, output_kind=kind
        )
        return outputs, steps, preemptions, first_kv

    def final(o):
        m = o.metrics
        return (
            o.token_ids,
            o.text,
            o.finish_reason,
            m.kv_bytes_after_prefill,
            m.kv_bytes_dense_after_prefill,
        )

    preempted = checked_kv = 0
    for seed in range(4):
        streamed, steps, preemptions, streamed_first_kv = run("stream", seed)
        finals_only, steps_final, _, _ = run("final_only", seed)
        assert steps_final == steps
        preempted += preemptions
        for rid, outs in finals_only.items():
            assert len(outs) == 1 and outs[0].finished, rid
            assert final(outs[0]) == final(streamed[rid][-1]), rid
            assert outs[0].delta_text == outs[0].text and outs[0].delta_token_ids == outs[0].token_ids
            if outs[0].token_ids and not streamed[rid][0].finished:
                # The KV bytes the streamed request's first output showed right after its prefill, which
                # the tracing span reports; the final-only request has them without that output.
                m = outs[0].metrics
                assert (m.kv_bytes_after_prefill, m.kv_bytes_dense_after_prefill) == streamed_first_kv[rid]
                assert m.kv_bytes_after_prefill > 0
                checked_kv += 1
    assert preempted > 0 and checked_kv > 10
