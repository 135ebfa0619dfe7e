"""Models from other frameworks: ``torch_export`` maps a ``torch.export`` program onto attngraph's ops."""
