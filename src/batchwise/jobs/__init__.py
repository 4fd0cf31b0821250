"""Cron jobs: loading job modules, their schedules, and running them once per scheduled time."""
