"""Federation: brokered rewrap across nation KAS."""
