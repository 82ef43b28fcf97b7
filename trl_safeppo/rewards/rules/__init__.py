"""Built-in rules. Each module holds a family of rules; `trl_safeppo.rewards.BUILTINS` maps YAML names to them."""
