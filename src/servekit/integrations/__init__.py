"""Integrations of servekit with other tools: a LiteLLM provider (``servekit.integrations.litellm``),
a RunPod serverless worker (``servekit.integrations.runpod``) and replicas on a Ray cluster
(``servekit.integrations.ray``).

Importing this package imports nothing else; each module imports its tool (litellm, runpod, ray) itself.
"""
