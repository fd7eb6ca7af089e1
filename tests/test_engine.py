"""The engine adapter and its health check, on the real gemma3-270m and the canary model."""

import json
import logging
import os
import sys
from pathlib import Path

import pytest

from orion_cli.engine import EngineCrashed, LoadSpec, Timings, canary_command, check_engine, load

CRASH = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]


def test_canary_falls_back_when_the_default_child_crashes(orion_home):
    """A child that dies by SIGSEGV with the default settings, as llama.cpp's AMX path does in a VM."""
    (orion_home / "engine-check.json").unlink()
    calls = []

    def command(model: Path, safe: bool) -> list[str]:
        calls.append(safe)
        return canary_command(model, safe) if safe else CRASH

    check = check_engine("test-key", command=command)
    assert calls == [False, True]
    assert not check.default_ok and check.default_signal == "SIGSEGV"
    assert check.use_extra_bufts is False
    assert check.tok_s_safe and check.tok_s_safe > 0  # the safe child really decoded
    assert "crash" in check.verdict()

    def must_not_run(model, safe):
        raise AssertionError("the verdict is cached per engine build and CPU")

    assert check_engine("test-key", command=must_not_run) == check
    assert json.loads((orion_home / "engine-check.json").read_text())["test-key"]["use_extra_bufts"] is False


def test_real_canary_gives_a_consistent_verdict(orion_home, engine_verdict):
    """The real canary, run afresh: whichever way this machine goes (defaults work, or they crash
    as GCC-built AMX kernels do on Intel Xeons), the verdict holds together and is repeatable."""
    (orion_home / "engine-check.json").unlink()
    check = check_engine("real-key")
    assert check.tok_s_safe and check.tok_s_safe > 0  # the safe settings always decode
    assert check.use_extra_bufts is check.default_ok
    if check.default_ok:
        assert check.tok_s_default > 0 and check.default_signal is None
    else:
        assert check.default_signal and check.tok_s_default is None
    assert check.default_ok is engine_verdict.default_ok  # the same verdict as the session's own run


def test_both_crash_is_a_clean_error(orion_home):
    with pytest.raises(EngineCrashed, match="crashes on this machine"):
        check_engine("k2", command=lambda model, safe: CRASH)


@pytest.mark.parametrize("use_extra_bufts,repacked", [(True, True), (False, False)])
def test_loads_use_the_recorded_settings(orion, orion_home, gemma_q4, use_extra_bufts, repacked, engine_verdict):
    if use_extra_bufts and not engine_verdict.default_ok:
        pytest.skip("llama.cpp's defaults crash on this machine (its engine check says so): only the safe "
                    "settings can be loaded; test_canary_falls_back_when_the_default_child_crashes covers it")
    cache = orion_home / "engine-check.json"
    doc = json.loads(cache.read_text())
    for entry in doc.values():
        entry["use_extra_bufts"] = use_extra_bufts
    cache.write_text(json.dumps(doc))
    proc = orion("--debug", "run", str(gemma_q4), "Hi", "--max-tokens", "2", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # llama.cpp's own log (shown with --debug) says whether weights were repacked (into the
    # interleaved layout, or into AMX tiles where the build has AMX and the CPU too)
    extra = ("CPU_REPACK model buffer size", "AMX model buffer size")
    assert any(line in proc.stderr for line in extra) is repacked


@pytest.fixture(scope="module")
def gemma(gemma_q4):
    model = load(LoadSpec(gemma_q4, 1024, 2))
    yield model
    model.close()


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("The capital of France is Paris. The capital of Germany is", "Berlin"),
        ("The chemical symbol for gold is", "Au"),
        ("Water boils at a temperature of", "100"),
        ("Monday, Tuesday, Wednesday,", "Thursday"),
        ("One, two, three, four,", "five"),
    ],
)
def test_real_completions_at_temperature_zero(gemma, prompt, expected):
    text = "".join(gemma.generate(prompt, max_tokens=8, temperature=0.0))
    assert expected in text, text


def test_generation_is_streamed_and_timed(gemma):
    t = Timings()
    pieces = list(gemma.generate("One, two, three,", max_tokens=6, temperature=0.0, timings=t))
    assert len(pieces) >= 3  # token by token, not one block
    assert t.prompt_tokens == gemma.count_tokens("One, two, three,")
    assert t.gen_tokens >= 5 and t.gen_tok_s > 0 and t.prompt_tok_s > 0


def test_seed_makes_sampling_repeatable(gemma):
    a = "".join(gemma.generate("Once upon a time", max_tokens=12, temperature=1.0, seed=7))
    b = "".join(gemma.generate("Once upon a time", max_tokens=12, temperature=1.0, seed=7))
    assert a == b


def test_profile_records_the_engine_verdict(orion, orion_home, engine_verdict):
    proc = orion("profile")
    assert proc.returncode == 0
    shown = "defaults work" if engine_verdict.default_ok else "defaults crash"
    assert "Engine" in proc.stdout and shown in proc.stdout
    import yaml

    doc = yaml.safe_load((orion_home / "strategy.yaml").read_text())
    assert doc["engine"]["use_extra_bufts"] is engine_verdict.use_extra_bufts
    assert doc["engine"]["default_ok"] is engine_verdict.default_ok
    assert os.environ["ORION_HOME"] == str(orion_home)


def test_load_progress_and_cancellation(gemma_q4):
    import threading

    from orion_cli.engine import LoadCancelled

    values = []
    model = load(LoadSpec(gemma_q4, 512, 2), progress=values.append)
    model.close()
    assert values[0] == 0.0 and values[-1] == 1.0 and values == sorted(values)

    cancel = threading.Event()

    def cancel_halfway(value: float) -> None:
        if value > 0.5:
            cancel.set()

    with pytest.raises(LoadCancelled, match="cancelled"):
        load(LoadSpec(gemma_q4, 512, 2), progress=cancel_halfway, cancel=cancel)


def test_the_verdict_records_the_builds_features_and_amx(orion_home, engine_verdict):
    from dataclasses import replace

    from orion_cli.engine import build_features, settings_for
    from orion_cli.enginecheck import cached_check

    features = build_features()
    assert features and all(f == f.upper() and " " not in f for f in features)
    assert engine_verdict.features == tuple(features)  # the canary child reported the same build
    on = replace(engine_verdict, default_ok=True, use_extra_bufts=True, features=("AVX2", "AMX_INT8"))
    assert on.amx and settings_for(on).amx and settings_for(on).repack
    crashed = replace(on, default_ok=False, use_extra_bufts=False)  # GCC-built AMX kernels: no AMX
    assert not crashed.amx and not settings_for(crashed).amx and not settings_for(crashed).repack
    assert not replace(on, features=("AVX2",)).amx

    # a verdict cached by an orion that did not record features is checked again
    cache = orion_home / "engine-check.json"
    doc = json.loads(cache.read_text())
    key = next(iter(doc))
    assert cached_check(key) == engine_verdict
    del doc[key]["features"]
    cache.write_text(json.dumps(doc))
    assert cached_check(key) is None


PARALLEL_PROMPTS = ["The capital of France is Paris. The capital of Germany is", "Monday, Tuesday, Wednesday,",
                    "Explain how a bicycle works.", "List some facts about the moon."]


def test_parallel_decoder_alone_matches_llama_cpp_python(gemma_q4):
    """One sequence through orion's decoder (every text path's) gives exactly the text of
    llama-cpp-python's own generation on the same model: the same prompt tokens, the same greedy
    choices; then four at once all finish, and the decoder frees every sequence's cells."""
    import threading

    from orion_cli.engine import ParallelDecoder, Timings, prompt_tokens

    model = load(LoadSpec(gemma_q4, 1024, 2, parallel=4))
    try:
        assert isinstance(model.decoder(), ParallelDecoder) and model.decoder() is model.decoder()
        solo = {}
        for prompt in PARALLEL_PROMPTS:
            reference = model._llm.create_completion(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]
            model._llm.reset()
            assert "".join(model.generate(prompt, max_tokens=12, temperature=0.0)) == reference, prompt
            tokens, _ = prompt_tokens(model, prompt)
            t = Timings()
            solo[prompt] = "".join(model.decoder().generate(tokens, max_tokens=12, temperature=0.0, timings=t))
            assert solo[prompt] == reference, prompt
            assert t.prompt_tokens == len(tokens) and t.gen_tokens >= 1 and t.gen_s > 0
        together, steps_before = {}, model.decoder().steps

        def ask(prompt: str) -> None:
            tokens, _ = prompt_tokens(model, prompt)
            together[prompt] = "".join(model.decoder().generate(tokens, max_tokens=12, temperature=0.0))

        threads = [threading.Thread(target=ask, args=(p,)) for p in PARALLEL_PROMPTS]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=300)
        assert set(together) == set(PARALLEL_PROMPTS) and all(together.values())
        # fewer decodes than one a token each: the sequences shared steps
        assert model.decoder().steps - steps_before < sum(len(model.tokenize(t, special=False)) for t in together.values()) + 4
        same = [p for p in PARALLEL_PROMPTS if together[p] == solo[p]]
        # At temperature 0 each answer usually equals its solo answer; the unified KV cache puts the other
        # sequences' cells in each one's attention span, which changes llama.cpp's summation order, and
        # that can flip a near-tie (seen on one prompt of four on an Intel Xeon with AMX).
        print(f"{len(same)} of {len(PARALLEL_PROMPTS)} concurrent answers equal their solo answers")
        assert len(same) >= 2, (together, solo)
        import llama_cpp

        memory = llama_cpp.llama_get_memory(model._llm._ctx.ctx)
        kept = model.decoder()._cached  # the prompt cache keeps finished sequences' cells, and only those
        assert kept and all(llama_cpp.llama_memory_seq_pos_max(memory, s) == len(kept[s]) - 1 if s in kept else
                            llama_cpp.llama_memory_seq_pos_max(memory, s) == -1 for s in range(4))
        model.decoder().forget_cache()
        assert all(llama_cpp.llama_memory_seq_pos_max(memory, s) == -1 for s in range(4))  # every cell freed
    finally:
        model.close()


def test_the_prompt_cache_reuses_a_conversation_and_gives_the_exact_modes_text(gemma_q4):
    """A chat's next turn resends the conversation: the decoder evaluates only what its cells do not
    hold (the earlier prompt and answer). The exact mode (cache_prompt False: every token evaluated
    again) gives what a fresh context gives: the reused cells were computed in other batches (the
    answer's tokens one a step), and the cached answer may part from it at a near-tie (seen here on
    this prompt after four tokens). A prompt that shares only a few first tokens (fewer than
    MIN_REUSE) is evaluated whole; another sequence's room takes kept cells back."""
    from orion_cli.engine import Timings, prompt_tokens
    from orion_cli.engine.decoder import MIN_REUSE

    story = ("The lighthouse stood on a rock at the end of the bay. Every night the keeper climbed its hundred "
             "steps, trimmed the wick, wound the clockwork and watched the beam sweep the water until dawn. ")
    model = load(LoadSpec(gemma_q4, 1024, 2, parallel=2))
    try:
        dec = model.decoder()
        first, _ = prompt_tokens(model, story + "The keeper's name was")
        assert len(first) > MIN_REUSE
        t1 = Timings()
        answer = "".join(dec.generate(first, max_tokens=8, temperature=0.0, timings=t1))
        assert t1.cached_tokens == 0 and answer
        kept = next(iter(dec._cached.values()))
        assert kept[: len(first)] == first and len(kept) == len(first) + 7  # the last token drawn is not fed
        follow = kept + model.tokenize(" And the bay was called", special=False)
        t2, exact = Timings(), Timings()
        cached = "".join(dec.generate(follow, max_tokens=8, temperature=0.0, timings=t2))
        assert t2.cached_tokens == len(kept) and t2.prompt_tokens == len(follow)
        exact_text = "".join(dec.generate(follow, max_tokens=8, temperature=0.0, timings=exact, cache_prompt=False))
        dec.forget_cache()
        fresh = "".join(dec.generate(follow, max_tokens=8, temperature=0.0))
        assert exact.cached_tokens == 0 and exact_text == fresh and cached
        first_again = "".join(dec.generate(first, max_tokens=8, temperature=0.0))  # the whole prompt kept:
        assert first_again == answer  # only its last token is evaluated again, with the same cells
        # a prompt that shares the story reuses it; one that shares a few first tokens does not
        other, _ = prompt_tokens(model, story + "The lamp burned")
        t3 = Timings()
        "".join(dec.generate(other, max_tokens=2, temperature=0.0, timings=t3))
        common = next(i for i, (a, b) in enumerate(zip(first, other)) if a != b)
        assert t3.cached_tokens == common > MIN_REUSE
        short, _ = prompt_tokens(model, "The lighthouse was white")
        t4 = Timings()
        "".join(dec.generate(short, max_tokens=2, temperature=0.0, timings=t4))
        assert t4.cached_tokens == 0
        # a prompt that needs the whole context takes the kept cells back
        long = model.tokenize("word " * 900, special=False)[:1000]
        t5 = Timings()
        assert "".join(dec.generate(long, max_tokens=4, temperature=0.0, timings=t5)) is not None
        assert t5.cached_tokens == 0 and sum(len(v) for v in dec._cached.values()) <= 1024
    finally:
        model.close()


def test_one_sampler_chain_in_process_and_in_the_server(gemma_q4):
    """The same request with the same seed at a temperature above 0 gives the same text through
    orion run's load and orion serve's (several sequences a decode): one sampler chain (top_p, temp,
    a seeded draw) for every path. (Before: the in-process path sampled with llama-cpp-python's own
    defaults, top_k 40 and min_p 0.05 on top, and the texts parted.)"""
    from orion_cli.engine import prompt_tokens

    prompt, options = "Write a short poem about the sea.", dict(max_tokens=32, temperature=1.0, top_p=0.95)
    texts = {}
    for parallel in (1, 4):  # orion run's load, then orion serve's
        model = load(LoadSpec(gemma_q4, 1024, 2, parallel=parallel))
        try:
            if parallel == 1:
                texts[parallel] = [("".join(model.generate(prompt, seed=seed, **options))) for seed in (7, 8)]
            else:
                tokens, _ = prompt_tokens(model, prompt)
                texts[parallel] = ["".join(model.decoder().generate(tokens, seed=seed, **options)) for seed in (7, 8)]
        finally:
            model.close()
    assert texts[1] == texts[4] and all(texts[1])
    assert texts[1][0] != texts[1][1]  # the seed is what decides


def test_llama_cpp_log_stays_quiet_without_debug(orion, gemma_q4):
    """A context past the model's training length makes llama.cpp warn; llama-cpp-python 0.3.36 prints
    every warning even when told to be quiet (its level table is one off ggml's). orion routes the log:
    nothing without --debug, everything with it."""
    import llama_cpp._logger as L

    assert L.GGML_LOG_LEVEL_TO_LOGGING_LEVEL[3] == logging.ERROR  # the one-off table engine.py works around
    args = ["run", str(gemma_q4), "hi", "--local", "--ctx", "65536", "--max-tokens", "2", "--temperature", "0"]
    quiet = orion(*args)
    assert quiet.returncode == 0 and "llama_" not in quiet.stderr and "n_ctx_train" not in quiet.stderr
    loud = orion("--debug", *args)
    assert loud.returncode == 0 and "n_ctx_train" in loud.stderr


def test_the_reach_ins_hold_for_the_pinned_llama_cpp_python(gemma_q4):
    """orion_cli.engine._binding (and the decoder) lean on llama-cpp-python's internals: this fails
    loudly, naming the one that moved, the day an upgrade changes them. pyproject pins the version."""
    import llama_cpp
    import llama_cpp.llama_cpp as C
    from llama_cpp import llama_chat_format

    from orion_cli.engine._binding import model_params, raw_context, raw_model

    assert llama_cpp.__version__ == "0.3.36", "written against 0.3.36: check every reach-in of engine/_binding.py"
    model_fields = {name for name, _ in C.llama_model_params._fields_}
    assert {"use_extra_bufts", "progress_callback", "devices"} <= model_fields
    assert {"n_seq_max", "kv_unified"} <= {name for name, _ in C.llama_context_params._fields_}
    original = C.llama_model_default_params
    with model_params(use_extra_bufts=False):
        assert C.llama_model_default_params is not original and not C.llama_model_default_params().use_extra_bufts
    assert C.llama_model_default_params is original
    assert hasattr(llama_chat_format, "Jinja2ChatFormatter")
    from llama_cpp._internals import LlamaModel

    assert hasattr(LlamaModel, "token_get_text")  # engine._binding.token_text
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    from orion_cli.engine._binding import llama_cpp_log_printer

    assert hasattr(Llava15ChatHandler, "_init_mtmd_context") and llama_cpp_log_printer()  # init_projector
    model = load(LoadSpec(gemma_q4, 256, 2))
    try:
        assert raw_context(model._llm) and raw_model(model._llm) and model._llm.context_params.n_ctx == 256
        assert llama_cpp.llama_model_get_vocab(raw_model(model._llm))
    finally:
        model.close()


def test_a_waiting_request_whose_client_left_ends_at_once(gemma_q4):
    """One sequence busy (n_seq 1): a second request waits for it; its caller's cancel (the client went
    away) ends the waiting one at the next step, without its prompt ever being evaluated."""
    import threading

    from orion_cli.engine import prompt_tokens

    model = load(LoadSpec(gemma_q4, 1024, 2))
    try:
        decoder = model.decoder()
        first_done, second_done = threading.Event(), threading.Event()
        first_started = threading.Event()
        out = {}

        def first():
            tokens, _ = prompt_tokens(model, "1, 2, 3, 4, 5, 6, 7, 8,", chat=False)
            pieces = []
            for piece in decoder.generate(tokens, max_tokens=150, temperature=0.0):
                first_started.set()
                pieces.append(piece)
            out["first"] = "".join(pieces)
            first_done.set()

        gone = threading.Event()

        def second():
            tokens, _ = prompt_tokens(model, "Tell me a story.", chat=False)
            out["second"] = "".join(decoder.generate(tokens, max_tokens=50, temperature=0.0, cancel=gone))
            second_done.set()

        threading.Thread(target=first, daemon=True).start()
        assert first_started.wait(60)
        threading.Thread(target=second, daemon=True).start()
        gone.set()
        assert second_done.wait(30)
        assert out["second"] == "" and not first_done.is_set(), "the waiting request ended only after the first"
        assert first_done.wait(120) and out["first"]
    finally:
        model.close()
