"""The application: the `rsna` CLI, the notebook plans run by papermill, the offline Kaggle
bundle."""
