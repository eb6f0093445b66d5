"""Writes ``client.py``: a small requests-based client matching the served API."""

from __future__ import annotations

import logging
import os

from servekit.api import LitAPI

logger = logging.getLogger(__name__)

_TEMPLATE = '''"""A client for the servekit server, generated when it started. Edit freely."""

import os

import requests

URL = os.environ.get("SERVEKIT_URL", "http://127.0.0.1:{port}") + "{path}"


def headers():
    api_key = os.environ.get("LIT_SERVER_API_KEY")
    return {{"X-API-Key": api_key}} if api_key else {{}}


def main():
{body}


if __name__ == "__main__":
    main()
'''

_PLAIN = """    response = requests.post(URL, json={{"input": 4.0}}, headers=headers(), timeout=60)
    print(f"Status: {{response.status_code}}\\nResponse:\\n {{response.text}}")"""

_STREAM = """    with requests.post(URL, json={{"input": 4.0}}, headers=headers(), stream=True, timeout=60) as response:
        for line in response.iter_lines():
            if line:
                print(line.decode())"""

_CHAT = """    payload = {{"model": "servekit", "messages": [{{"role": "user", "content": "Hello!"}}], "stream": {stream}}}
    response = requests.post(URL, json=payload, headers=headers(), timeout=60)
    print(f"Status: {{response.status_code}}\\nResponse:\\n {{response.text}}")"""


def client_source(api: LitAPI, port: int) -> str:
    spec = api.spec
    if spec is not None and spec.endpoints:
        path = spec.endpoints[0].path
        body = _CHAT.format(stream=str(api.stream)) if "chat" in path else _PLAIN.format()
    else:
        path = api.api_path
        body = _STREAM.format() if api.stream else _PLAIN.format()
    return _TEMPLATE.format(port=port, path=path, body=body)


def write_client_file(api: LitAPI, port: int, directory: str | None = None) -> None:
    path = os.path.join(directory or os.getcwd(), "client.py")
    if os.path.exists(path):
        logger.debug("client.py already exists; not overwriting it")
        return
    try:
        with open(path, "w") as f:
            f.write(client_source(api, port))
    except OSError as error:
        logger.warning("could not write %s: %s", path, error)
