"""Helpers shared by the test suite (running appliances, fake control servers)."""
