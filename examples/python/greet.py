"""A Python function: the event on stdin, the answer on stdout.

Publish a JSON object such as {"name": "Ada"} to the topic `greet`.
"""

import json
import os
import sys

raw = sys.stdin.read()
try:
    name = json.loads(raw).get("name", "world")
except (ValueError, AttributeError):
    name = raw.strip() or "world"
attempt = os.environ.get("Http_Ebb_Attempt", "?")
print(f"greet: hello, {name} (attempt {attempt})", file=sys.stderr)
print(json.dumps({"greeting": f"Hello, {name}!"}))
