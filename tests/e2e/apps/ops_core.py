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


if __name__ == "__main__":
    ls.LitServer(OpsAPI(), max_batch_size=1).run(port=int(os.environ["PORT"]), generate_client_file=False)
