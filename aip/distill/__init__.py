"""Knowledge transfer from the teacher: feature taps, attention transfer, output and adversarial losses."""
