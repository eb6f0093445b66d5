# A core app for the operations tests: logs while predicting, can be slow, can crash its worker.
import logging
import os
import time

import servekit as ls

logger = logging.getLogger("ops_app")


class OpsAPI(ls.LitAPI):
    def setup(self, device):
        pass

    def predict(self, x):
        logger.warning("predicting %s", x.get("input"))
        if x.get("crash"):
            os._exit(3)
        time.sleep(float(x.get("delay", 0)))  # the workload: a slow model
        return {"output": x.get("input")}


class BatchedOpsAPI(ls.LitAPI):
    def setup(self, device):
        pass

    def predict(self, xs):
        return [{"output": x.get("input"), "batch_size": len(xs)} for x in xs]


if __name__ == "__main__":
    batched = bool(os.environ.get("OPS_BATCHED"))
    api = BatchedOpsAPI(max_batch_size=4, batch_timeout=0.5) if batched else OpsAPI()
    ls.LitServer(api).run(port=int(os.environ["PORT"]), generate_client_file=False)
