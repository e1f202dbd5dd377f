"""Genome: intervals, chromosome names, liftover, build detection, cCRE vocabulary."""
