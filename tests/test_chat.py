"""orion_cli/chat.py: the conversation both REPLs drive, with fake backends (and one real model), and
the server layer's chat policy (orion_cli/server/remote.py): the server while it answers, this
process after."""

from __future__ import annotations

import pytest

from orion_cli.chat import AnswerLost, ChatSession, LocalChat


class FakeBackend:
    """Answers with fixed pieces; records what it was asked."""

    via = None

    def __init__(self, name="fake", pieces=("Hello", " there"), keeps_turns=True, fail_at=None):
        self.name, self.pieces, self.keeps_turns, self.fail_at = name, list(pieces), keeps_turns, fail_at
        self.asked: list[dict] = []
        self.closed = False
        self.released = 0

    def reply(self, prompt, *, system=None, history=(), images=(), timings=None):
        self.asked.append({"prompt": prompt, "system": system, "history": list(history)})
        try:
            for i, piece in enumerate(self.pieces):
                if self.fail_at == i:
                    raise self.error
                yield piece
        finally:
            self.released += 1

    def load(self, name):
        if name == "missing":
            from orion_cli.errors import NotFound

            raise NotFound("unknown model 'missing'")
        self.name = name

    def loaded(self):
        return {"models": [], "max_models": 1, "budget_bytes": 1}

    def close(self):
        self.closed = True


def test_messages_are_system_history_prompt():
    assert ChatSession(FakeBackend()).messages("hi") == [{"role": "user", "content": "hi"}]
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert ChatSession(FakeBackend(), system="be brief", history=list(history)).messages("c") == [
        {"role": "system", "content": "be brief"}, *history, {"role": "user", "content": "c"}]


def test_a_session_keeps_its_turns_and_streams_each_piece():
    backend = FakeBackend()
    session = ChatSession(backend, system="be brief")
    seen: list[str] = []
    reply = session.send("one", seen.append)
    assert (reply.text, reply.model, reply.via, seen) == ("Hello there", "fake", None, ["Hello", " there"])
    session.send("two")
    assert backend.asked[1] == {"prompt": "two", "system": "be brief", "history": [
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "Hello there"}]}
    assert session.messages("three")[0] == {"role": "system", "content": "be brief"}
    assert len(session.messages("three")) == 6
    session.clear()
    assert session.history == []


def test_a_plain_completion_model_keeps_no_conversation():
    session = ChatSession(FakeBackend(keeps_turns=False))
    session.send("one")
    assert session.history == []


def test_load_starts_afresh_and_a_wrong_name_changes_nothing():
    from orion_cli.errors import NotFound

    backend = FakeBackend()
    session = ChatSession(backend)
    session.send("one")
    with pytest.raises(NotFound):
        session.load("missing")
    assert backend.name == "fake" and len(session.history) == 2
    session.load("other")
    assert backend.name == "other" and session.history == []


def test_an_error_leaves_the_conversation_as_it_was():
    from orion_cli.errors import InvalidValue

    backend = FakeBackend()
    session = ChatSession(backend)
    session.send("one")
    backend.fail_at, backend.error = 1, InvalidValue("the context holds 256 tokens")
    with pytest.raises(InvalidValue):
        session.send("two")
    assert [m["content"] for m in session.history] == ["one", "Hello there"]
    assert backend.released == 2  # the answer's hold on the model was let go


def test_ctrl_c_keeps_what_came_and_is_raised():
    backend = FakeBackend(pieces=("Hel", "lo"))
    session = ChatSession(backend)

    def stop_after_first(piece):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.send("one", stop_after_first)
    assert session.history[-1] == {"role": "assistant", "content": "Hel"}
    assert backend.released == 1  # the generator left half-way was closed


def test_an_answer_lost_half_way_is_asked_again_once():
    class Flaky(FakeBackend):
        def reply(self, prompt, **kwargs):
            if not self.asked:
                self.asked.append({"prompt": prompt})
                yield "half an ans"
                raise AnswerLost("the server went away")
            yield from super().reply(prompt, **kwargs)

    backend = Flaky()
    session = ChatSession(backend)
    restarts, seen = [], []
    reply = session.send("one", seen.append, on_restart=lambda: restarts.append(1))
    assert reply.text == "Hello there" and restarts == [1] and seen == ["half an ans", "Hello", " there"]
    assert session.history[-1]["content"] == "Hello there"  # not the lost half


# ---------------------------------------------------------------- the server layer's policy


class FakeRemote(FakeBackend):
    via = "http://127.0.0.1:1"

    def __init__(self, gone_at=None, **kwargs):
        super().__init__(name="served", **kwargs)
        self.gone_at = gone_at

    def _gone(self):
        from orion_cli.server.client import ServerGone

        return ServerGone("orion serve at http://127.0.0.1:1 closed the stream early")

    def reply(self, prompt, **kwargs):
        for i, piece in enumerate(self.pieces):
            if self.gone_at == i:
                raise self._gone()
            yield piece

    def load(self, name):
        raise self._gone()


def test_served_chat_moves_into_this_process_when_the_server_goes():
    from orion_cli.server.remote import ServedChat

    made, notices = [], []

    def make_local(name):
        made.append(name)
        return FakeBackend(name=f"local-{name}", pieces=("here",))

    served = ServedChat(FakeRemote(gone_at=0), make_local, notices.append)
    session = ChatSession(served)
    assert (served.name, served.via) == ("served", "http://127.0.0.1:1")
    reply = session.send("one")
    assert reply.text == "here" and (reply.model, reply.via) == ("local-served", None)
    assert made == ["served"] and notices == ["orion serve at http://127.0.0.1:1 closed the stream early"]
    assert session.history[-1]["content"] == "here"
    session.send("two")
    assert made == ["served"] and len(notices) == 1  # once
    session.close()
    assert served.local.closed


def test_served_chat_loads_here_when_the_server_went_during_load():
    from orion_cli.server.remote import ServedChat

    served = ServedChat(FakeRemote(), lambda name: FakeBackend(name=name), lambda line: None)
    ChatSession(served).load("other")
    assert served.local is not None and served.name == "other"


def test_without_a_server_the_backend_is_this_process(orion_home):
    from orion_cli.server.remote import chat_backend

    local = FakeBackend()
    assert chat_backend("m", {}, lambda name: local) is local
    assert chat_backend("m", {}, lambda name: local, local=True) is local


def test_a_real_model_through_the_manager(gemma_q4):
    """The test Gemma has no chat template: its first prompt is a plain continuation, and the turns
    are kept (given to the model in gemma's turn format: the second prompt holds the first)."""
    from orion_cli.engine import Timings
    from orion_cli.loading import manager_for
    from orion_cli.models import LocalModel
    from orion_cli.strategy import load_strategy

    strategy = load_strategy({"n_ctx": 512})
    local = LocalModel(name="g", kind="llm", path=str(gemma_q4), source="path")
    backend = LocalChat(manager_for(strategy), local, strategy, {"max_tokens": 4, "temperature": 0.0})
    session = ChatSession(backend)
    try:
        first_t, second_t = Timings(), Timings()
        first = session.send("Count: one, two, three,", timings=first_t)
        assert first.text and first.via is None and first.model == "g"
        assert backend.keeps_turns and [m["role"] for m in session.history] == ["user", "assistant"]
        session.send("Count: one, two, three,", timings=second_t)
        assert len(session.history) == 4 and second_t.prompt_tokens > 2 * first_t.prompt_tokens
        assert [m["name"] for m in session.loaded()["models"]] == ["g"]
        assert session.loaded()["keep_alive_s"] == strategy.keep_alive_s
    finally:
        session.close()


def test_the_fallback_formats_keep_every_message():
    from orion_cli.messages import chat_format, fallback_format, system_in_first_turn, transcript

    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi, I am Ada."},
                {"role": "assistant", "content": "Hello Ada."}, {"role": "user", "content": "Who am I?"}]
    text, stops = transcript(messages)
    assert text == "Be terse.\n\nUser: Hi, I am Ada.\nAssistant: Hello Ada.\nUser: Who am I?\nAssistant:"
    assert stops == ["\nUser:"]
    assert system_in_first_turn(messages) == [{"role": "user", "content": "Be terse.\n\nHi, I am Ada."}] + messages[2:]
    assert system_in_first_turn(messages[:1]) == [{"role": "user", "content": "Be terse."}]
    assert fallback_format("gemma3") == "gemma" and fallback_format("qwen2") == "chatml"
    assert fallback_format("mamba") == "transcript"
    # which applies: the GGUF's own template always; without one, a chat once there are earlier turns
    history = messages[1:3]
    assert chat_format(True, False, "gemma3", None, (), None) == "gguf"
    assert chat_format(False, False, "gemma3", "Be terse.", (), None) == "none"
    assert chat_format(False, False, "gemma3", None, history, None) == "gemma"
    assert chat_format(False, False, "mamba", None, history, None) == "transcript"
    assert chat_format(False, False, "gemma3", None, (), True) == "gemma"
    assert chat_format(True, False, "gemma3", None, history, False) == "none"
    assert chat_format(False, True, "llama", None, (), None) == "chat-handler"


def test_a_family_without_a_known_format_is_chatted_with_in_a_transcript(gemma_q4):
    """The test Gemma taken for an architecture llama-cpp-python has no format for: the prompt is the
    transcript, every turn in it, and the answer stops where the model would write the user's turn."""
    from types import SimpleNamespace

    from orion_cli.engine import LoadSpec, load

    model = load(LoadSpec(gemma_q4, 512, 2))
    try:
        model.header = SimpleNamespace(architecture="mamba")
        history = [{"role": "user", "content": "Hi, I am Ada."}, {"role": "assistant", "content": "Hello Ada."}]
        tokens, stops = model.prompt_tokens("Who am I?", system="Be terse.", history=history)
        assert stops == ["\nUser:"] and model.chat_format("Be terse.", history, None) == "transcript"
        assert model._llm.detokenize(tokens).decode() == (
            "Be terse.\n\nUser: Hi, I am Ada.\nAssistant: Hello Ada.\nUser: Who am I?\nAssistant:")
        uncut = "".join(model.decoder().generate(tokens, max_tokens=48, temperature=0.0))
        answer = "".join(model.generate("Who am I?", system="Be terse.", history=history, max_tokens=48,
                                        temperature=0.0))
        assert "\nUser:" in uncut and answer == uncut[:uncut.index("\nUser:")] and "Ada" in answer
        # gemma's turns (llama-cpp-python's format_gemma): an answer stopped before its first piece is a
        # turn of its own, closed, not the open turn the model answers in
        model.header = SimpleNamespace(architecture="gemma3")
        tokens, stops = model.prompt_tokens("Who am I?", history=[{"role": "user", "content": "Hi"},
                                                                  {"role": "assistant", "content": ""}])
        assert stops == ["<end_of_turn>"] and model._llm.detokenize(tokens, special=True).decode() == (
            "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n <end_of_turn>\n"
            "<start_of_turn>user\nWho am I?<end_of_turn>\n<start_of_turn>model\n")
    finally:
        model.close()
