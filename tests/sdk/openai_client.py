"""Drives a running Collie with the official OpenAI Python SDK, the way an
application beside it would, and prints what it saw as one JSON object.
Usage: openai_client.py BASE_URL TENANT KEY
"""
import json
import sys

import openai
from openai import OpenAI

base, tenant, key = sys.argv[1:4]
client = OpenAI(base_url=base, api_key=key, default_headers={"X-Tenant-ID": tenant},
                max_retries=0)
seen = {"sdk_version": openai.__version__}

reply = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}])
seen["chat"] = {"content": reply.choices[0].message.content, "model": reply.model,
                "total_tokens": reply.usage.total_tokens}

# The SDK writes `messages` before `model`: a long prompt puts the model at
# the end of a large body.
long_prompt = "lorem ipsum " * 100_000
reply = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": long_prompt}])
seen["long_chat_prompt_tokens"] = reply.usage.prompt_tokens

chunks, usage_chunks, text = 0, 0, ""
for chunk in client.chat.completions.create(
        model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "Hi"}]):
    chunks += 1
    if chunk.usage is not None:
        usage_chunks += 1
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
seen["stream"] = {"chunks": chunks, "usage_chunks": usage_chunks, "text": text}

usage = None
for chunk in client.chat.completions.create(
        model="gpt-4o-mini", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Hi"}]):
    if chunk.usage is not None:
        usage = chunk.usage.total_tokens
seen["stream_with_usage_total"] = usage

emb = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
seen["embeddings"] = {"count": len(emb.data), "dims": len(emb.data[0].embedding)}

seen["models"] = sorted(m.id for m in client.models.list())

try:
    OpenAI(base_url=base, api_key="sk-wrong", default_headers={"X-Tenant-ID": tenant},
           max_retries=0).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    seen["wrong_key"] = "accepted"
except openai.AuthenticationError as e:
    seen["wrong_key"] = {"status": e.status_code, "code": e.code}

try:
    client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "Hi"}])
    seen["unknown_model"] = "accepted"
except openai.NotFoundError as e:
    seen["unknown_model"] = {"status": e.status_code, "code": e.code}

print(json.dumps(seen))
