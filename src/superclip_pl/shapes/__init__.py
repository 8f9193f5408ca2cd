"""The offline demo, apart from the library (which never imports it): shape scenes, the data set
writer, the BPE tokenizer trainer, the experiment runner, `demo` and `ablation`. Its plots need the
`demo` extra (matplotlib)."""
