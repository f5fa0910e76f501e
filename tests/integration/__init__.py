"""End-to-end tests: a real ``vtl serve`` process and real iSCSI initiators over 127.0.0.1."""
