"""Integrations of servekit with other tools: a LiteLLM provider (``servekit.integrations.litellm``)
and a RunPod serverless worker (``servekit.integrations.runpod``).

Importing this package imports nothing else; each module imports its tool (litellm, runpod) itself.
"""
