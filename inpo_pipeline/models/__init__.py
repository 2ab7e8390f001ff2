"""The models a run loads and writes: the reference model of stage one, the policy of stage two, checkpoints, exports."""
