"""Phase 1, blockwise local distillation: the corpus as a token stream (`corpus`), the teacher's live attention
inputs/outputs (`teacher_tap`), the training of a block of layers' students on them (`block`, resumable
through `checkpoint`), and each layer's result and artefacts (`training`). Defaults in `config`."""
