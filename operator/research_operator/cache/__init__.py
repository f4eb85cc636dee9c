"""The cache: what runs and what waits, as the watches show it plus this process's intents; the settings snapshot."""
