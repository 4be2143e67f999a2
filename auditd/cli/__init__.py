"""The command line: `auditd` and its subcommands."""
