"""Phase 1, blockwise local distillation: the corpus (`corpus`), the teacher's attention inputs and outputs
(`capture`) and the training of one linear-attention student per layer against them (`training`)."""
