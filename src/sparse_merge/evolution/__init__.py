"""Evolutionary merging: archive, scoring, selection, operators, schedules, evolvers."""
