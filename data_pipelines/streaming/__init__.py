"""The streaming stack, one way: shards -> epoch plan -> readers -> decode/transform ->
sampler -> collate -> loader (``loader.build_train_loader``); and the evaluation loader
(``eval_loader``), which reads shards with the same reader."""
