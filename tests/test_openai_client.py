"""The shared OpenAI HTTP client pieces: URL building, error bodies, SSE decoding (offline)."""

import pytest

from parity.errors import BenchError, RequestError
from parity.openai_client import SSEDecoder, SSEFormatError, endpoint_url, error_message, server_root


def test_server_root_and_endpoint_url():
    assert server_root("http://h:8000/v1/") == "http://h:8000"
    assert endpoint_url("https://h/x/v1", "completions") == "https://h/x/v1/completions"
    with pytest.raises(RequestError, match="--base-url 'ftp://x' is not a URL"):
        server_root("ftp://x")
    with pytest.raises(BenchError, match="--endpoint must be one of chat, completions"):
        endpoint_url("http://h", "embeddings", BenchError)


def test_error_message_shapes():
    assert error_message(b'{"error": {"message": "bad key"}}') == "bad key"
    assert error_message(b'{"detail": "Not Found"}') == "Not Found"
    assert error_message(b"  plain text ") == "plain text"
    assert error_message(b"") == "<empty body>"


def test_sse_decoder_events_split_across_chunks():
    d = SSEDecoder()
    stream = b': comment\r\nevent: x\ndata: {"a":\ndata:1}\n\ndata: [DO' + b"NE]\n\ndata: tail"
    out = []
    for i in range(0, len(stream), 5):
        out += list(d.feed(stream[i : i + 5]))
    assert out == ['{"a":\n1}', "[DONE]"]
    assert d.flush() == "tail" and d.flush() is None


def test_sse_decoder_malformed_line_after_earlier_events():
    d = SSEDecoder()
    it = d.feed(b"data: 1\n\nbogus line\n")
    assert next(it) == "1"
    with pytest.raises(SSEFormatError, match="malformed SSE: unexpected line 'bogus line'"):
        next(it)
