"""A local LiteLLM custom handler file (``custom_handler: custom_handler.handler`` in config.yaml):
servekit's provider with its defaults set here instead of in each model's ``litellm_params``."""

import os

from servekit.integrations.litellm import ServekitLLM

handler = ServekitLLM(api_base=os.environ.get("SERVEKIT_API_BASE"), api_key=os.environ.get("SERVEKIT_API_KEY"))
