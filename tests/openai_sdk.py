"""The router's OpenAI-compatible API driven by the official `openai` Python package.

Started by tests/tests/openai_sdk.rs against a real router and worker serving builtin:tiny:
    python tests/openai_sdk.py BASE_URL API_KEY
Completions and chat, whole and streamed, and the errors the SDK turns into its exceptions.
Exits non-zero on the first failed check.
"""

import sys

import openai

base_url, api_key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)
# onehead's extra fields travel in `extra_body`, as they do to vLLM.
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}

models = client.models.list().data
assert [m.id for m in models] == ["builtin:tiny"], models
model = models[0].id

# Completions: whole, then streamed with usage; the pieces add up to the whole text.
whole = client.completions.create(model=model, prompt="def fibonacci(n):", max_tokens=8, **GREEDY)
assert whole.object == "text_completion", whole
assert whole.choices[0].finish_reason == "length", whole
assert whole.usage.completion_tokens == 8 and whole.usage.prompt_tokens == 17, whole.usage
stream = client.completions.create(
    model=model,
    prompt="def fibonacci(n):",
    max_tokens=8,
    stream=True,
    stream_options={"include_usage": True},
    **GREEDY,
)
chunks = list(stream)
text = "".join(c.choices[0].text for c in chunks if c.choices)
assert text == whole.choices[0].text, (text, whole.choices[0].text)
assert chunks[-1].usage.total_tokens == 25, chunks[-1]
assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

# Chat: the model's template, the role first in the stream, the same text either way.
messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=6, **GREEDY)
assert chat.object == "chat.completion", chat
assert chat.choices[0].message.role == "assistant", chat
assert chat.choices[0].finish_reason == "length", chat
chat_chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=6, stream=True, **GREEDY))
assert chat_chunks[0].choices[0].delta.role == "assistant", chat_chunks[0]
streamed = "".join(c.choices[0].delta.content or "" for c in chat_chunks)
assert streamed == chat.choices[0].message.content, (streamed, chat.choices[0].message.content)

# The same prompt through the completions API gives the same text: the template is the model's.
rendered = "<|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\n"
plain = client.completions.create(model=model, prompt=rendered, max_tokens=6, **GREEDY)
assert plain.choices[0].text == chat.choices[0].message.content

# Errors become the SDK's exceptions, with the field named.
try:
    client.completions.create(model=model, prompt="x", max_tokens=100000)
    raise AssertionError("max_tokens over the limit was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.body["param"] == "max_tokens", e.body
try:
    client.chat.completions.create(model="gpt-4o", messages=messages)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401, e
try:
    client.completions.create(model=model, prompt="x", n=2)
    raise AssertionError("n=2 was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "n", e.body

print(f"openai {openai.__version__}: all checks passed")
