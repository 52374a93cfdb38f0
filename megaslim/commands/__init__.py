"""The commands: each wires the libraries below into validate -> build -> run -> report."""
