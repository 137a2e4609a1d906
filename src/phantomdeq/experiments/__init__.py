"""Paper experiments as commands: synthetic setting (Fig. 1), ablation (Table 1), cost (Table 2)."""
