"""Models from other frameworks: ``torch_export`` maps a ``torch.export`` program onto attngraph's ops;
``hf_decoding`` gives a Hugging Face causal LM's KV-cached decode step as the entries attngraph's generation drives."""
