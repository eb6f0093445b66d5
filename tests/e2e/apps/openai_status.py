# A chat API behind OpenAISpec that answers the status its last message names ("status:429"): for
# checking that clients and proxies keep a server's overload statuses.
import os

from fastapi import HTTPException

import servekit as ls


class StatusAPI(ls.LitAPI):
    def setup(self, device):
        pass

    def predict(self, request):
        text = request.messages[-1].content
        if text.startswith("status:"):
            raise HTTPException(status_code=int(text.split(":", 1)[1]), detail=f"answered {text} on purpose")
        yield "ok"


if __name__ == "__main__":
    server = ls.LitServer(StatusAPI(spec=ls.OpenAISpec()), accelerator="cpu", timeout=30)
    server.run(port=int(os.environ["PORT"]), host="127.0.0.1", generate_client_file=False)
