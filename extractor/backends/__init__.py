"""Generation backends: hf (transformers + peft, our fast decoder), vllm, openai-compatible servers, echo.
Chosen by name through plugins.BACKENDS, imported only when chosen."""
