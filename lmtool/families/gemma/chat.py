"""Gemma's instruction-tuned turn format."""

from __future__ import annotations

from ...errors import LmtoolError


def format_chat(messages: list[dict[str, str]]) -> str:
    """Render messages as Gemma-it expects, ending with the model's turn opened.

    Gemma has no system role: a system message is folded into the first user turn, which is what
    Google's own examples do. The BOS token is left to the tokenizer.
    """
    messages = list(messages)
    if messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"].strip()
        if messages and messages[0]["role"] == "user":
            messages[0] = {"role": "user", "content": f"{system}\n\n{messages[0]['content']}"}
        else:
            messages.insert(0, {"role": "user", "content": system})
    text = ""
    for i, message in enumerate(messages):
        role = {"assistant": "model"}.get(message["role"], message["role"])
        expected = "user" if i % 2 == 0 else "model"
        if role != expected:
            raise LmtoolError(f"chat messages must alternate user/model turns; turn {i + 1} is '{message['role']}'")
        text += f"<start_of_turn>{role}\n{message['content'].strip()}<end_of_turn>\n"
    return text + "<start_of_turn>model\n"
