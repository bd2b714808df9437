"""Ray Data pipelines: the corpus encode job and the bulk rerank job. Stages are callable classes testable without Ray."""
