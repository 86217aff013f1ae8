"""SLURM batch templates (package so that setup.py installs the *.sbatch files)."""
