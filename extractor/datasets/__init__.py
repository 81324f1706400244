"""Data made or read here: synthetic postings, SkillSpan, tiny local models, the comparison-calibration simulator."""
