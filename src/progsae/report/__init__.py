"""The report of a run, from its results.json alone: CSV tables (`tables`), PNG figures (`figures`) and
report.html (`page.write_report`); and the feature browser of one SAE (`browser`), which the run's interp
stage and `progsae browse` write. Nothing is imported here: the run writes browsers without loading the page."""
